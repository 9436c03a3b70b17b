"""clip_teacher.py: the Paddle CLIP ViT gives unilm's CLIP target (OpenAI's code, random weights) from images in
[0, 1]; build_clip_teacher returns it frozen, sized from its weights file, and refuses files that do not fit."""
import re

import numpy as np
import paddle
import pytest

from clip_reference import TINY, VIT_B_16, openai_clip, random_images, unilm_target
from clip_teacher import CLIPTeacher, CLIPWeightsError, build_clip_teacher
from torch_checkpoint import to_paddle_layout

TOLERANCE = 1e-5  # fp32, max abs feature difference (features reach a few units)


def teacher_like(model) -> CLIPTeacher:
    """A CLIPTeacher holding the visual weights of OpenAI's ``model``."""
    teacher = CLIPTeacher(**TINY)
    visual = {name: value.detach().numpy() for name, value in model.state_dict().items() if name.startswith('visual.')}
    teacher.set_state_dict(to_paddle_layout(visual, teacher))
    return teacher.eval()


def save_teacher(model, path) -> str:
    paddle.save(teacher_like(model).state_dict(), str(path))
    return str(path)


def test_patch_features_equal_unilms_clip_target():
    reference = openai_clip(TINY, seed=1)
    images = random_images(4, TINY['input_resolution'], seed=2)
    features = teacher_like(reference).patch_features(paddle.to_tensor(images))
    assert features.dtype == paddle.float32 and features.shape == [4, 16, 48]
    assert features.stop_gradient
    expected = unilm_target(reference, images)
    np.testing.assert_allclose(features.numpy(), expected, rtol=0, atol=TOLERANCE)
    assert np.abs(expected).max() > 1  # features of trained-like magnitude, not a vanishing signal


def test_values_outside_zero_one_are_clamped_as_unilm_clamps_them():
    """A bicubic resize overshoots [0, 1]; unilm's scaling layer clamps to [0, 255] pixels."""
    reference = openai_clip(TINY, seed=3)
    images = random_images(2, TINY['input_resolution'], seed=4) * 1.6 - 0.3
    features = teacher_like(reference).patch_features(paddle.to_tensor(images)).numpy()
    np.testing.assert_allclose(features, unilm_target(reference, images), rtol=0, atol=TOLERANCE)


def test_default_is_vit_b16_frozen_with_openais_names():
    teacher = build_clip_teacher(None)
    assert teacher.feature_dim == 512 and not teacher.training
    assert all(param.stop_gradient for param in teacher.parameters())
    openai = {name: tuple(value.shape) for name, value in openai_clip(VIT_B_16).state_dict().items()
              if name.startswith('visual.')}
    ours = {name: tuple(value.shape) for name, value in teacher.state_dict().items()}
    assert ours.keys() == openai.keys()
    transposed = {name for name in ours if re.search(r'(out_proj|c_fc|c_proj)\.weight$', name)}
    assert len(transposed) == 36
    for name, shape in openai.items():
        assert ours[name] == (shape[::-1] if name in transposed else shape), name


def test_images_of_another_size_are_refused():
    teacher = CLIPTeacher(**TINY)
    with pytest.raises(ValueError, match=r'takes images \[B, 3, 32, 32\], got \[1, 3, 48, 48\]'):
        teacher.patch_features(paddle.rand([1, 3, 48, 48]))


def test_weights_file_sets_the_size(tmp_path):
    reference = openai_clip(TINY, seed=5)
    path = save_teacher(reference, tmp_path / 'clip.pdparams')
    teacher = build_clip_teacher(path)
    assert teacher.feature_dim == 48 and not teacher.training
    assert all(param.stop_gradient for param in teacher.parameters())
    images = random_images(2, 32, seed=6)
    np.testing.assert_allclose(teacher.patch_features(paddle.to_tensor(images)).numpy(),
                               unilm_target(reference, images), rtol=0, atol=TOLERANCE)
    assert build_clip_teacher(path, width=128, output_dim=48).feature_dim == 48


def _without(state_dict: dict, name: str) -> dict:
    return {key: value for key, value in state_dict.items() if key != name}


BAD_FILES = {
    'missing file': (None, r'CLIP weights not found: {path} \(convert OpenAI\'s ViT-B-16.pt with load_clip_weights.py'),
    'another model': ({'cls_token': paddle.zeros([1, 1, 8])},
                      r'{path}: not a CLIP ViT image encoder \(no visual.conv1.weight, visual.positional_embedding, '
                      r'visual.proj among its 1 tensors'),
    'a missing block tensor': ('visual.transformer.resblocks.1.ln_2.bias',
                               r"{path}: not the tensors of this CLIP image encoder: 1 missing "
                               r"\['visual.transformer.resblocks.1.ln_2.bias'\]"),
    'width not a multiple of 64': ({'visual.conv1.weight': paddle.zeros([32, 3, 8, 8]),
                                    'visual.positional_embedding': paddle.zeros([17, 32]),
                                    'visual.proj': paddle.zeros([32, 16])},
                                   r'{path}: not a CLIP ViT image encoder \(input_resolution, .* at least 1, '
                                   r'got 32, 8, 32, 0, 0, 16\)'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_bad_weights_file_is_refused_naming_it(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / 'clip.pdparams'
    if isinstance(content, str):
        state_dict = teacher_like(openai_clip(TINY)).state_dict()
        paddle.save(_without(state_dict, content), str(path))
    elif content is not None:
        paddle.save(content, str(path))
    with pytest.raises(CLIPWeightsError, match=message.format(path=re.escape(str(path)))):
        build_clip_teacher(str(path))


def test_size_other_than_asked_is_refused(tmp_path):
    path = save_teacher(openai_clip(TINY), tmp_path / 'clip.pdparams')
    with pytest.raises(CLIPWeightsError, match=rf'{re.escape(path)} holds a CLIP encoder with input_resolution=32, '
                                               'output_dim=48, not input_resolution=224, output_dim=512'):
        build_clip_teacher(path, input_resolution=224, output_dim=512)
    with pytest.raises(TypeError, match=r"unknown CLIPTeacher arguments: \['depth'\]"):
        build_clip_teacher(path, depth=2)
