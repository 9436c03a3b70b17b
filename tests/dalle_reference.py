"""OpenAI's dall_e package as the oracle: random-weight encoders, saved the way encoder.pkl was, and inputs.

The package's classes carry the module names (``dall_e.encoder``) that torch.save writes into a pickle, as in
OpenAI's encoder.pkl.
"""
import attr
import numpy as np
import torch
from dall_e.decoder import Decoder
from dall_e.encoder import Encoder
from PIL import Image

from transforms import map_pixels

TINY = {'n_hid': 16, 'vocab_size': 512}  # below the package's limits (n_hid >= 64): its validators are off
SMALL = {'n_hid': 64, 'n_blk_per_group': 1, 'vocab_size': 1024, 'input_channels': 4}
TOKENIZER_SIZE = 112  # BEiT tokenizes a 112 px view: 14x14 ids


def openai_encoder(seed: int = 0, bias_std: float = 0.1, **kwargs) -> torch.nn.Module:
    """The package's Encoder with its own random init, plus random biases (it starts them at zero, which would
    hide a bias mapped to the wrong place)."""
    torch.manual_seed(seed)
    with attr.validators.disabled():
        encoder = Encoder(**kwargs)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.endswith('.b'):
                param.add_(torch.randn_like(param) * bias_std)
    return encoder.eval()


def openai_decoder(**kwargs) -> torch.nn.Module:
    """The package's Decoder (random weights): converting decoder.pkl by mistake must be caught."""
    with attr.validators.disabled():
        return Decoder(**kwargs)


def photo_batch(paths, size: int = TOKENIZER_SIZE, channels: int = 3) -> np.ndarray:
    """Real photos as the tokenizer sees them: LANCZOS resize, [0, 1], map_pixels; NCHW float32.
    Extra channels (for a wider input) repeat the first ones."""
    images = [np.asarray(Image.open(p).convert('RGB').resize((size, size), Image.LANCZOS), np.float32) / 255
              for p in paths]
    batch = np.stack(images).transpose(0, 3, 1, 2)
    return map_pixels(np.concatenate([batch, batch], axis=1)[:, :channels]).astype(np.float32)


def random_batch(batch_size: int, size: int = TOKENIZER_SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).random((batch_size, channels, size, size), dtype=np.float32)
    return map_pixels(pixels)


def openai_logits(encoder: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return encoder(torch.from_numpy(images)).numpy()


def numpy_state_dict(encoder: torch.nn.Module) -> dict:
    return {name: tensor.numpy() for name, tensor in encoder.state_dict().items()}


def compare_with_openai(reference: torch.nn.Module, tokenizer, images: np.ndarray) -> tuple[float, float]:
    """(max abs logit difference, fraction of equal token ids) of our tokenizer against the package's encoder.

    Ids may only differ where the package's own top two logits are closer than twice the largest difference
    (there float rounding may pick either); an id differing anywhere else fails here.
    """
    import paddle
    expected = openai_logits(reference, images)
    with paddle.no_grad():
        inputs = paddle.to_tensor(images)
        logits = tokenizer(inputs).numpy()
        ids = tokenizer.get_codebook_indices(inputs).numpy()
    assert logits.shape == expected.shape and logits.dtype == np.float32
    difference = float(np.abs(logits - expected).max())
    batch = len(images)
    expected_ids = expected.argmax(axis=1).reshape(batch, -1)  # cells in row-major order
    top_two = np.sort(expected, axis=1)[:, -2:]
    margins = (top_two[:, 1] - top_two[:, 0]).reshape(batch, -1)
    assert ids.dtype == np.int64 and ids.shape == expected_ids.shape
    differing = ids != expected_ids
    assert not (differing & (margins > 2 * difference)).any(), (
        f'ids differ where the logits are clearly apart: margins {margins[differing]}, difference {difference}')
    return difference, float((~differing).mean())
