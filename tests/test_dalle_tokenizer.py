"""dalle_tokenizer.py against OpenAI's dall_e package: same parameters, logits and token ids; build_tokenizer, errors.
(The converter and the full-size encoder: test_load_dalle_weights.py.)"""
import numpy as np
import paddle
import pytest

from dalle_reference import (
    SMALL,
    TINY,
    compare_with_openai,
    numpy_state_dict,
    openai_encoder,
    photo_batch,
    random_batch,
)
from dalle_tokenizer import Encoder, TokenizerWeightsError, build_tokenizer, encoder_from_state_dict
from helpers import write_file

TOLERANCE = 1e-4  # fp32, max abs logit difference


def test_parameters_have_the_packages_names_and_shapes():
    reference = openai_encoder()
    with paddle.LazyGuard():
        ours = Encoder()
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert {name: tuple(tensor.shape) for name, tensor in ours.state_dict().items()} == expected
    assert sum(int(np.prod(shape)) for shape in expected.values()) == 53_786_240  # the published encoder's size


@pytest.mark.parametrize('size', ['tiny', 'small'])
def test_logits_and_ids_match_the_package(photo_paths, size):
    kwargs = {'tiny': TINY, 'small': SMALL}[size]
    reference = openai_encoder(**kwargs)
    ours = encoder_from_state_dict(numpy_state_dict(reference), 'test').eval()
    channels = kwargs.get('input_channels', 3)
    for images in (photo_batch(photo_paths, channels=channels), random_batch(3, channels=channels),
                   random_batch(1, size=64, channels=channels, seed=1)):
        difference, id_agreement = compare_with_openai(reference, ours, images)
        assert difference <= TOLERANCE
        assert id_agreement >= 0.99


def test_group_count_sets_the_downsampling():
    images = paddle.to_tensor(random_batch(2, size=32))
    for group_count, cells in ((4, 4), (3, 8), (1, 32)):
        encoder = build_tokenizer(None, group_count=group_count, n_hid=8, n_blk_per_group=1, vocab_size=10)
        assert encoder.downsampling == 32 // cells
        assert encoder(images).shape == [2, 10, cells, cells]
        assert encoder.get_codebook_indices(images).shape == [2, cells * cells]


def test_random_tokenizer_is_frozen_and_in_eval_mode():
    tokenizer = build_tokenizer(None, **TINY)
    assert not tokenizer.training
    assert all(param.stop_gradient for param in tokenizer.parameters())
    images = paddle.to_tensor(random_batch(1, size=16))
    images.stop_gradient = False
    assert tokenizer.get_codebook_indices(images).stop_gradient  # no graph is kept for the targets


def test_wrong_input_is_refused():
    tokenizer = build_tokenizer(None, **TINY)
    with pytest.raises(ValueError, match=r'takes \[B, 3, H, W\] images, got \[1, 4, 16, 16\]'):
        tokenizer(paddle.to_tensor(random_batch(1, size=16, channels=4)))


@pytest.mark.parametrize('kwargs, message', [
    ({'n_hid': 6}, 'n_hid must be a positive multiple of 4'),
    ({'n_hid': 0}, 'n_hid must be'),
    ({'group_count': 0}, 'must be at least 1'),
    ({'vocab_size': 0}, 'must be at least 1'),
])
def test_bad_encoder_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Encoder(**kwargs)


@pytest.fixture(scope='module')
def tiny_reference():
    return openai_encoder(**TINY)


@pytest.fixture
def tiny_weights(tmp_path, tiny_reference):
    """The tiny encoder's tensors as a .pdparams, the layout load_dalle_weights.py writes."""
    path = tmp_path / 'tiny.pdparams'
    paddle.save({name: paddle.to_tensor(value) for name, value in numpy_state_dict(tiny_reference).items()},
                str(path))
    return path


def test_build_tokenizer_reads_the_size_from_the_file(photo_paths, tiny_reference, tiny_weights):
    tokenizer = build_tokenizer(str(tiny_weights))
    assert not tokenizer.training and all(param.stop_gradient for param in tokenizer.parameters())
    difference, _ = compare_with_openai(tiny_reference, tokenizer, photo_batch(photo_paths[:3]))
    assert difference <= TOLERANCE
    build_tokenizer(str(tiny_weights), n_hid=16, vocab_size=512, group_count=4)  # agreeing arguments are fine


def _save(path, state_dict):
    paddle.save({name: paddle.to_tensor(value) for name, value in state_dict.items()}, str(path))
    return path


def _tiny_tensors():
    return numpy_state_dict(openai_encoder(**TINY))


BAD_WEIGHTS = {
    'missing': (lambda tmp: tmp / 'nope.pdparams', 'tokenizer weights not found: {path}'),
    'text': (lambda tmp: write_file(tmp / 'w.pdparams', b'not weights at all\n' * 4), '{path}: not a readable'),
    'empty': (lambda tmp: write_file(tmp / 'w.pdparams', b''), '{path}: not a readable'),
    'not a dict': (lambda tmp: _paddle_save(tmp / 'w.pdparams', [paddle.ones([2])]), '{path}: holds a list'),
    'another model': (lambda tmp: _save(tmp / 'w.pdparams', {'head.weight': np.ones((2, 2), np.float32)}),
                      '{path}: not a DALL-E encoder'),
    'wrong shape': (lambda tmp: _save(tmp / 'w.pdparams', {
        **_tiny_tensors(), 'blocks.group_2.block_1.res_path.conv_2.w': np.ones((8, 8, 1, 1), np.float32)}),
        r'{path}: blocks.group_2.block_1.res_path.conv_2.w has shape \[8, 8, 1, 1\], .* needs \[8, 8, 3, 3\]'),
    'missing tensor': (lambda tmp: _save(tmp / 'w.pdparams', {
        name: value for name, value in _tiny_tensors().items() if name != 'blocks.group_3.block_2.res_path.conv_4.b'}),
        r"{path}: not the tensors of a DALL-E encoder: 1 missing \['blocks.group_3.block_2.res_path.conv_4.b'\]"),
    'extra tensor': (lambda tmp: _save(tmp / 'w.pdparams', {**_tiny_tensors(), 'mask_token': np.ones(3, np.float32)}),
                     r"1 unexpected \['mask_token'\]"),
}


def _paddle_save(path, obj):
    paddle.save(obj, str(path))
    return path


@pytest.mark.parametrize('case', sorted(BAD_WEIGHTS))
def test_unusable_weights_are_named(tmp_path, case):
    make, message = BAD_WEIGHTS[case]
    path = make(tmp_path)
    with pytest.raises(TokenizerWeightsError, match=message.format(path=path)):
        build_tokenizer(str(path))


def test_weights_of_another_size_than_asked_are_refused(tiny_weights):
    with pytest.raises(TokenizerWeightsError, match=f'{tiny_weights} holds an encoder with n_hid=16, not n_hid=256'):
        build_tokenizer(str(tiny_weights), n_hid=256)
    with pytest.raises(TypeError, match='unknown Encoder arguments'):
        build_tokenizer(str(tiny_weights), hidden=16)
