"""The encoder of OpenAI's DALL-E discrete VAE (arXiv 2102.12092) in Paddle: BEiT's image tokenizer.

BEiT's targets are the ids this encoder gives the 14x14 cells of a 112 px view (``get_codebook_indices``).
Parameter names and layouts are those of the ``dall_e`` package's Encoder state dict (``blocks.input.w``,
``blocks.group_1.block_1.res_path.conv_1.b``, ...: convolution kernels [out, in, k, k] in both frameworks),
so a converted file is that state dict unchanged; ``load_dalle_weights.py`` writes it.
"""
import math
import re

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import weights_file
from errors import BadInputError

_GROUP_NAME = re.compile(r'blocks\.group_(\d+)\.')
_FIRST_GROUP_BLOCK_NAME = re.compile(r'blocks\.group_1\.block_(\d+)\.')


class TokenizerWeightsError(BadInputError):
    """Tokenizer weights that are missing, unreadable or not a DALL-E encoder of the asked size."""


class Conv2d(nn.Layer):
    """A size-preserving convolution whose parameters are named ``w`` and ``b``, as in OpenAI's files."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.padding = (kernel_size - 1) // 2
        fan_in = in_channels * kernel_size ** 2
        self.w = self.create_parameter([out_channels, in_channels, kernel_size, kernel_size],
                                       default_initializer=nn.initializer.Normal(std=1 / math.sqrt(fan_in)))
        self.b = self.create_parameter([out_channels], is_bias=True,
                                       default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class EncoderBlock(nn.Layer):
    """Residual block: identity (a 1x1 projection where the width changes) plus ``post_gain`` times four
    ReLU-conv layers (3x3, 3x3, 3x3, 1x1) through a bottleneck of a quarter of the output width."""

    def __init__(self, in_channels: int, out_channels: int, post_gain: float):
        super().__init__()
        hidden = out_channels // 4
        self.id_path = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.res_path = nn.Sequential(
            ('relu_1', nn.ReLU()), ('conv_1', Conv2d(in_channels, hidden, 3)),
            ('relu_2', nn.ReLU()), ('conv_2', Conv2d(hidden, hidden, 3)),
            ('relu_3', nn.ReLU()), ('conv_3', Conv2d(hidden, hidden, 3)),
            ('relu_4', nn.ReLU()), ('conv_4', Conv2d(hidden, out_channels, 1)))
        self.post_gain = post_gain

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Layer):
    """Mapped pixels [B, C, H, W] -> logits [B, vocab_size, H / 2**(group_count - 1), W / 2**(group_count - 1)].

    A 7x7 input convolution to ``n_hid`` channels, then ``group_count`` groups of ``n_blk_per_group`` blocks;
    group g (from 1) is n_hid * 2**(g-1) wide and all but the last end with a 2x2 max pool; then ReLU and a
    1x1 convolution to the vocabulary. OpenAI's encoder has group_count 4 (so H / 8) and defaults elsewhere.
    """

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192):
        super().__init__()
        _check_encoder_arguments(group_count, n_hid, n_blk_per_group, input_channels, vocab_size)
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.downsampling = 2 ** (group_count - 1)
        post_gain = 1 / (group_count * n_blk_per_group) ** 2
        layers = [('input', Conv2d(input_channels, n_hid, 7))]
        width = n_hid
        for group in range(1, group_count + 1):
            group_width = n_hid * 2 ** (group - 1)
            blocks = [(f'block_{i + 1}', EncoderBlock(width if i == 0 else group_width, group_width, post_gain))
                      for i in range(n_blk_per_group)]
            if group < group_count:
                blocks.append(('pool', nn.MaxPool2D(kernel_size=2)))
            layers.append((f'group_{group}', nn.Sequential(*blocks)))
            width = group_width
        layers.append(('output', nn.Sequential(('relu', nn.ReLU()), ('conv', Conv2d(width, vocab_size, 1)))))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f'the DALL-E encoder takes [B, {self.input_channels}, H, W] images, got {list(x.shape)}')
        return self.blocks(x)

    @paddle.no_grad()
    def get_codebook_indices(self, x: paddle.Tensor) -> paddle.Tensor:
        """Token ids int64 [B, h * w]: the most likely code of each cell, cells in row-major order."""
        return self(x).argmax(axis=1).flatten(1)


def _check_encoder_arguments(group_count, n_hid, n_blk_per_group, input_channels, vocab_size) -> None:
    if min(group_count, n_blk_per_group, input_channels, vocab_size) < 1:
        raise ValueError('group_count, n_blk_per_group, input_channels and vocab_size must be at least 1, got '
                         f'{group_count}, {n_blk_per_group}, {input_channels}, {vocab_size}')
    if n_hid < 4 or n_hid % 4:
        raise ValueError(f'n_hid must be a positive multiple of 4 (blocks narrow to a quarter), got {n_hid}')


def encoder_kwargs_from_state_dict(state_dict: dict, source: str) -> dict:
    """The Encoder arguments that ``state_dict`` was made with: the tensor shapes tell them all, so files of
    any size load without a config (and a tiny random encoder converts like OpenAI's)."""
    if 'blocks.input.w' not in state_dict or 'blocks.output.conv.w' not in state_dict:
        raise TokenizerWeightsError(f'{source}: not a DALL-E encoder (no blocks.input.w / blocks.output.conv.w '
                                    f'among its {len(state_dict)} tensors, e.g. {", ".join(list(state_dict)[:3])})')
    input_shape = [int(size) for size in state_dict['blocks.input.w'].shape]
    if len(input_shape) != 4 or input_shape[2:] != [7, 7]:
        hint = ' (the shape of the DALL-E decoder: convert encoder.pkl)' if input_shape[2:] == [1, 1] else ''
        raise TokenizerWeightsError(f'{source}: blocks.input.w has shape {input_shape}, the DALL-E encoder has '
                                    f'[n_hid, channels, 7, 7]{hint}')
    n_hid, input_channels = input_shape[:2]
    kwargs = {'group_count': _count_indices(_GROUP_NAME, state_dict),
              'n_hid': n_hid,
              'n_blk_per_group': _count_indices(_FIRST_GROUP_BLOCK_NAME, state_dict),
              'input_channels': input_channels,
              'vocab_size': int(state_dict['blocks.output.conv.w'].shape[0])}
    try:
        _check_encoder_arguments(**kwargs)
    except ValueError as err:
        raise TokenizerWeightsError(f'{source}: not a DALL-E encoder ({err})') from None
    return kwargs


def _count_indices(pattern: re.Pattern, names) -> int:
    return len({match.group(1) for name in names if (match := pattern.match(name))})


def check_state_dict_fits(state_dict: dict, model, source: str) -> None:
    weights_file.check_fits(state_dict, model, source, error=TokenizerWeightsError, what='a DALL-E encoder')


def encoder_from_state_dict(state_dict: dict, source: str, **expected_kwargs) -> Encoder:
    """An Encoder of the size ``state_dict`` describes, holding its tensors; ``expected_kwargs`` (any Encoder
    arguments) must agree with that size."""
    found = encoder_kwargs_from_state_dict(state_dict, source)
    unknown = set(expected_kwargs) - set(found)
    if unknown:
        raise TypeError(f'unknown Encoder arguments: {sorted(unknown)}')
    differing = {key: value for key, value in expected_kwargs.items() if found[key] != value}
    if differing:
        raise TokenizerWeightsError(
            f'{source} holds an encoder with {", ".join(f"{key}={found[key]}" for key in differing)}, '
            f'not {", ".join(f"{key}={value}" for key, value in differing.items())}')
    model = Encoder(**found)
    check_state_dict_fits(state_dict, model, source)
    model.set_state_dict(state_dict)
    return model


def build_tokenizer(weights_path: str | None = None, *, trust_pickle: bool = False, **encoder_kwargs) -> Encoder:
    """The frozen tokenizer in eval mode: converted weights from ``weights_path`` (size read from the file, read
    without running code unless ``trust_pickle``), or random weights of the given size when it is None (tests, dry
    runs)."""
    if weights_path is None:
        model = Encoder(**encoder_kwargs)
    else:
        model = encoder_from_state_dict(_read_pdparams(weights_path, trust_pickle), weights_path, **encoder_kwargs)
    return weights_file.frozen(model)


def _read_pdparams(path: str, trust_pickle: bool) -> dict:
    return weights_file.read_state_dict(path, trust_pickle=trust_pickle, what='tokenizer weights',
                                       error=TokenizerWeightsError,
                                       converter_hint='convert encoder.pkl with load_dalle_weights.py')
