"""vqkd_tokenizer.py against a timm-built reference of unilm's VQ-KD tokenizer (tests/vqkd_reference.py), with
random weights in unilm's layout converted as load_vqkd_weights.py converts them; loading, freezing and refusals."""
import re

import numpy as np
import paddle
import pytest
import torch

from dalle_tokenizer import build_tokenizer
from helpers import truncated
from load_vqkd_weights import split_state_dict
from torch_checkpoint import to_paddle_layout
from utils import save_atomically
from vqkd_reference import BASE, TINY, UnilmVQKD, compare_ids, random_images
from vqkd_tokenizer import VQKDTokenizer, VQKDWeightsError, build_vqkd_tokenizer

# Max abs difference of the unit-length 32-d features (components ~0.18): float32 through a few blocks gives
# ~3e-7 at the tiny size and ~1e-6 at ViT-B; 1e-5 leaves room for other BLAS kernels and is still 100 times below
# what a dropped [-1, 1] mapping or normalisation changes.
FEATURE_TOLERANCE = 1e-5
AMBIGUOUS_SHARE = 0.01  # of patches whose two nearest codes are within float noise: random codes make ties rare


def tokenizer_of(reference: UnilmVQKD, arch: dict) -> VQKDTokenizer:
    """Our tokenizer holding the reference's weights, taken from its unilm-style state dict."""
    tensors = {name: tensor.numpy() for name, tensor in reference.unilm_state_dict().items()}
    kept, _ = split_state_dict(tensors, 'reference')
    model = build_vqkd_tokenizer(**arch)
    model.set_state_dict(to_paddle_layout(kept, model))
    return model


def compare(reference: UnilmVQKD, tokenizer: VQKDTokenizer, images: np.ndarray) -> tuple[float, int, int]:
    """(max abs feature difference, differing ids, ambiguous positions); compare_ids fails on any id that differs
    where the reference's nearest codes are clearly apart."""
    expected = reference.features(images)
    with paddle.no_grad():
        inputs = paddle.to_tensor(images)
        features = tokenizer.features(inputs).numpy()
        ids = tokenizer.tokens(inputs).numpy()
    assert features.shape == expected.shape and features.dtype == np.float32
    difference = float(np.abs(features - expected).max())
    differing, ambiguous = compare_ids(reference, expected, ids, difference)
    return difference, differing, ambiguous


def test_tiny_features_and_ids_match_unilm_reference():
    reference = UnilmVQKD(**TINY)
    tokenizer = tokenizer_of(reference, TINY)
    images = random_images(64, TINY['img_size'])
    difference, differing, ambiguous = compare(reference, tokenizer, images)
    positions = images.shape[0] * (TINY['img_size'] // TINY['patch_size']) ** 2
    print(f'tiny: feature difference {difference:.3g}, {differing} ids differ, {ambiguous} of {positions} '
          'positions ambiguous')
    assert difference <= FEATURE_TOLERANCE
    assert ambiguous <= AMBIGUOUS_SHARE * positions


@pytest.mark.slow
def test_vit_base_16_at_224_matches_unilm_reference():
    """unilm's released size: ViT-B/16, 224 px, 8192 x 32 codebook."""
    reference = UnilmVQKD(**BASE, seed=3)
    tokenizer = tokenizer_of(reference, BASE)
    images = random_images(2, BASE['img_size'], seed=3)
    difference, differing, ambiguous = compare(reference, tokenizer, images)
    print(f'ViT-B/16: feature difference {difference:.3g}, {differing} ids differ, {ambiguous} of 392 ambiguous')
    assert difference <= FEATURE_TOLERANCE
    assert ambiguous <= AMBIGUOUS_SHARE * 392


def test_codebook_is_used_as_stored_with_unilm_distance():
    """Rows of unequal length: unilm's |z|^2 + |e|^2 - 2 z.e is not the largest dot product then, and the
    ids must follow unilm (the lookup does not renormalise the codebook)."""
    reference = UnilmVQKD(**TINY, seed=5)
    with torch.no_grad():
        reference.codebook.mul_(torch.linspace(0.5, 1.5, reference.codebook.shape[0])[:, None])
    tokenizer = tokenizer_of(reference, TINY)
    images = random_images(64, TINY['img_size'], seed=5)
    features = reference.features(images)
    by_dot_product = (features @ reference.codebook.detach().numpy().T).argmax(-1)
    assert (by_dot_product != reference.distances(features).argmin(-1)).mean() > 0.1  # the case is a real one
    difference, _, ambiguous = compare(reference, tokenizer, images)
    assert difference <= FEATURE_TOLERANCE
    assert ambiguous <= AMBIGUOUS_SHARE * features.shape[0] * features.shape[1]


def test_ids_may_differ_only_where_the_nearest_codes_tie():
    """compare_ids itself: a duplicated code makes every patch nearest to it a tie, where either id is right;
    an id changed anywhere else fails."""
    reference = UnilmVQKD(**TINY)
    features = reference.features(random_images(8, TINY['img_size']))
    ids = reference.distances(features).argmin(-1)
    with torch.no_grad():
        reference.codebook[-1] = reference.codebook[ids[0, 0]]
    ids = reference.distances(features).argmin(-1)
    tied = ids == ids[0, 0]
    swapped = np.where(tied, reference.codebook.shape[0] - 1, ids)
    assert compare_ids(reference, features, swapped, 0.0) == (int(tied.sum()), int(tied.sum()))
    swapped[~tied] = (swapped[~tied] + 1) % reference.codebook.shape[0]
    with pytest.raises(AssertionError, match='ids differ where the nearest codes are clearly apart'):
        compare_ids(reference, features, swapped, 0.0)


def test_tokenizer_is_frozen_in_eval_mode_and_gives_int64_ids():
    tokenizer = build_vqkd_tokenizer(**TINY)
    assert not tokenizer.training and all(param.stop_gradient for param in tokenizer.parameters())
    images = paddle.to_tensor(random_images(3, TINY['img_size']))
    ids = tokenizer.get_codebook_indices(images)
    assert ids.dtype == paddle.int64 and ids.shape == [3, 16]
    np.testing.assert_array_equal(ids.numpy(), tokenizer(images).numpy())
    assert int(ids.min()) >= 0 and int(ids.max()) < TINY['codebook_size']
    features = tokenizer.features(images)
    np.testing.assert_allclose(np.linalg.norm(features.numpy(), axis=-1), 1.0, atol=1e-6)


def test_default_size_is_unilms_vit_base_16_with_8192_codes():
    model = build_vqkd_tokenizer()
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes['encoder.pos_embed'] == (1, 197, 768)
    assert shapes['encoder.patch_embed.proj.weight'] == (768, 3, 16, 16)
    assert shapes['quantize.embedding.weight'] == (8192, 32)
    assert len({name.split('.')[2] for name in shapes if name.startswith('encoder.blocks.')}) == 12


def test_converted_weights_load_from_pdparams(tmp_path):
    reference = UnilmVQKD(**TINY)
    path = tmp_path / 'vqkd.pdparams'
    save_atomically(tokenizer_of(reference, TINY).state_dict(), str(path))
    tokenizer = build_vqkd_tokenizer(str(path), **TINY)
    difference, _, _ = compare(reference, tokenizer, random_images(4, TINY['img_size']))
    assert difference <= FEATURE_TOLERANCE


def _saved_tiny(tmp_path):
    path = tmp_path / 'vqkd.pdparams'
    save_atomically(build_vqkd_tokenizer(**TINY).state_dict(), str(path))
    return path


BAD_WEIGHTS = {
    'missing file': (lambda tmp: tmp / 'nope.pdparams', TINY, r'tokenizer weights not found: {path}'),
    'truncated file': (lambda tmp: truncated(_saved_tiny(tmp)), TINY, r'{path}: not a readable \.pdparams file'),
    'other depth': (_saved_tiny, {**TINY, 'depth': 3}, r"{path}: not the tensors of this VQ-KD tokenizer: 13 "
                                                       r"missing \['encoder.blocks.2.norm1.weight'"),
    'other codebook size': (_saved_tiny, {**TINY, 'codebook_size': 8192},
                            r'{path}: quantize.embedding.weight has shape \[1024, 32\], this VQ-KD tokenizer '
                            r'needs \[8192, 32\]'),
}


@pytest.mark.parametrize('case', sorted(BAD_WEIGHTS))
def test_bad_weights_are_refused_naming_the_file(tmp_path, case):
    make_path, arch, message = BAD_WEIGHTS[case]
    path = make_path(tmp_path)
    with pytest.raises(VQKDWeightsError, match=message.format(path=re.escape(str(path)))):
        build_vqkd_tokenizer(str(path), **arch)


def test_a_dalle_tokenizer_file_is_refused(tmp_path):
    path = tmp_path / 'dalle.pdparams'
    save_atomically(build_tokenizer(n_hid=16, vocab_size=64).state_dict(), str(path))
    with pytest.raises(VQKDWeightsError, match='not the tensors of this VQ-KD tokenizer'):
        build_vqkd_tokenizer(str(path), **TINY)
