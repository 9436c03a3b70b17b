"""OpenAI's CLIP image encoder (ViT) in Paddle, frozen: the teacher whose patch features BEiT v2's VQ-KD tokenizer
learns to reconstruct (unilm's beit2 distils CLIP ViT-B/16).

The target is unilm's: the image in [0, 1] clamped to it and normalised with CLIP's mean and std, the ViT run to
its last block, ``ln_post`` applied to every token, then ``@ proj``, the class token dropped (OpenAI's own forward
applies ``ln_post`` and ``proj`` to the class token only).

Parameter names are those of OpenAI's CLIP state dict, ``visual.`` prefix kept (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight``, ``visual.proj``), so load_clip_weights.py maps OpenAI's
tensors one to one: Linear weights in Paddle's [in, out] layout; ``in_proj_weight`` [3 * width, width] and
``proj`` [width, output_dim] as OpenAI stores them (plain parameters, not Linear layers).
"""
import math
import re

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import weights_file
from errors import BadInputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # OpenAI's CLIP gives its ViTs width // 64 heads (the head count is not in the tensor shapes)
VIT_B_16 = {'input_resolution': 224, 'patch_size': 16, 'width': 768, 'layers': 12, 'heads': 12, 'output_dim': 512}
_BLOCK_NAME = re.compile(r'visual\.transformer\.resblocks\.(\d+)\.')


class CLIPWeightsError(BadInputError):
    """CLIP weights that are missing, unreadable or not a CLIP ViT image encoder of the asked size."""


class MultiheadSelfAttention(nn.Layer):
    """torch.nn.MultiheadAttention's self-attention with its parameter names: q, k and v from one packed
    ``in_proj_weight`` [3 * width, width] (torch's layout, used transposed) and bias, then ``out_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = self.create_parameter([3 * width, width])
        self.in_proj_bias = self.create_parameter([3 * width], is_bias=True)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, length, width = x.shape
        qkv = paddle.matmul(x, self.in_proj_weight, transpose_y=True) + self.in_proj_bias
        qkv = qkv.reshape([batch, length, 3, self.heads, width // self.heads]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = F.softmax(paddle.matmul(q * (width // self.heads) ** -0.5, k, transpose_y=True), axis=-1)
        out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([batch, length, width])
        return self.out_proj(out)


class QuickGELU(nn.Layer):
    """CLIP's activation, x * sigmoid(1.702 x) (not the exact GELU)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * F.sigmoid(1.702 * x)


class MLP(nn.Layer):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Layer):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (torch's LayerNorm epsilon, 1e-5)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, epsilon=1e-5)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width, epsilon=1e-5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Layer):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.LayerList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Layer):
    """CLIP's ViT: patch convolution without bias, class token, absolute positions, ``ln_pre``, the blocks,
    ``ln_post`` and the projection ``proj`` to the joint embedding (``output_dim``)."""

    def __init__(self, *, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        _check_arguments(input_resolution, patch_size, width, layers, heads, output_dim)
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2D(3, width, kernel_size=patch_size, stride=patch_size, bias_attr=False)
        self.class_embedding = self.create_parameter([width])
        self.positional_embedding = self.create_parameter([(input_resolution // patch_size) ** 2 + 1, width])
        self.ln_pre = nn.LayerNorm(width, epsilon=1e-5)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, epsilon=1e-5)
        self.proj = self.create_parameter([width, output_dim])
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        """OpenAI's initialisation scales (random weights serve tests and dry runs only)."""
        scale = width ** -0.5
        for param in (self.class_embedding, self.positional_embedding, self.proj):
            param.set_value(paddle.randn(param.shape) * scale)
        for block in self.transformer.resblocks:
            for param, std in ((block.attn.in_proj_weight, scale),
                               (block.attn.out_proj.weight, scale * (2 * layers) ** -0.5),
                               (block.mlp.c_fc.weight, (2 * width) ** -0.5),
                               (block.mlp.c_proj.weight, scale * (2 * layers) ** -0.5)):
                param.set_value(paddle.randn(param.shape) * std)
            nn.initializer.Constant(0.0)(block.attn.in_proj_bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Normalised images [B, 3, R, R] -> every token after ``ln_post``, projected: [B, 1 + N, output_dim]."""
        x = self.conv1(x).flatten(2).transpose([0, 2, 1])
        cls = self.class_embedding.reshape([1, 1, -1]).expand([x.shape[0], 1, x.shape[2]])
        x = self.ln_pre(paddle.concat([cls, x], axis=1) + self.positional_embedding)
        return paddle.matmul(self.ln_post(self.transformer(x)), self.proj)


class CLIPTeacher(nn.Layer):
    """Images in [0, 1] -> CLIP's patch features, the VQ-KD tokenizer's regression target."""

    def __init__(self, *, input_resolution: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, output_dim: int = 512):
        super().__init__()
        self.visual = VisionTransformer(input_resolution=input_resolution, patch_size=patch_size, width=width,
                                        layers=layers, heads=heads, output_dim=output_dim)
        self.feature_dim = output_dim
        self.input_resolution = input_resolution
        self.register_buffer('mean', paddle.to_tensor(CLIP_MEAN).reshape([1, 3, 1, 1]), persistable=False)
        self.register_buffer('std', paddle.to_tensor(CLIP_STD).reshape([1, 3, 1, 1]), persistable=False)

    @paddle.no_grad()
    def patch_features(self, images: paddle.Tensor) -> paddle.Tensor:
        """Images [B, 3, R, R] in [0, 1], not normalised -> float32 patch features [B, (R / patch) ** 2,
        feature_dim], patches in row-major order. Values outside [0, 1] (a bicubic resize overshoots) are
        clamped, as unilm's round trip through [-1, 1] and 0-255 clamps them."""
        shape = list(images.shape)
        if len(shape) != 4 or shape[1:] != [3, self.input_resolution, self.input_resolution]:
            raise ValueError(f'the CLIP teacher takes images [B, 3, {self.input_resolution}, '
                             f'{self.input_resolution}], got {shape}')
        normalised = (images.astype('float32').clip(0.0, 1.0) - self.mean) / self.std
        return self.visual(normalised)[:, 1:].astype('float32')

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.patch_features(images)


def _check_arguments(input_resolution, patch_size, width, layers, heads, output_dim) -> None:
    if min(input_resolution, patch_size, width, layers, heads, output_dim) < 1:
        raise ValueError('input_resolution, patch_size, width, layers, heads and output_dim must be at least 1, got '
                         f'{input_resolution}, {patch_size}, {width}, {layers}, {heads}, {output_dim}')
    if input_resolution % patch_size or width % heads:
        raise ValueError(f'input_resolution {input_resolution} must be a multiple of patch_size {patch_size} and '
                         f'width {width} of heads {heads}')


def clip_kwargs_from_state_dict(state_dict: dict, source: str) -> dict:
    """The CLIPTeacher arguments of OpenAI-named visual tensors: the shapes tell all but the head count, which
    is OpenAI's width // 64."""
    required = ('visual.conv1.weight', 'visual.positional_embedding', 'visual.proj')
    absent = [name for name in required if name not in state_dict]
    if absent:
        raise CLIPWeightsError(f'{source}: not a CLIP ViT image encoder (no {", ".join(absent)} among its '
                               f'{len(state_dict)} tensors, e.g. {", ".join(list(state_dict)[:3])})')
    width, _, patch_size, _ = state_dict['visual.conv1.weight'].shape
    grid = math.isqrt(state_dict['visual.positional_embedding'].shape[0] - 1)
    if grid * grid + 1 != state_dict['visual.positional_embedding'].shape[0]:
        raise CLIPWeightsError(f'{source}: visual.positional_embedding holds '
                               f'{state_dict["visual.positional_embedding"].shape[0] - 1} patches, not a square grid')
    kwargs = {'input_resolution': int(grid * patch_size), 'patch_size': int(patch_size), 'width': int(width),
              'layers': len({m.group(1) for name in state_dict if (m := _BLOCK_NAME.match(name))}),
              'heads': int(width) // HEAD_WIDTH, 'output_dim': int(state_dict['visual.proj'].shape[1])}
    try:
        _check_arguments(**kwargs)
    except ValueError as err:
        raise CLIPWeightsError(f'{source}: not a CLIP ViT image encoder ({err})') from None
    return kwargs


def check_state_dict_fits(state_dict: dict, model: CLIPTeacher, source: str) -> None:
    weights_file.check_fits(state_dict, model, source, error=CLIPWeightsError, what='this CLIP image encoder')


def build_clip_teacher(weights_path: str | None = None, *, trust_pickle: bool = False, **kwargs) -> CLIPTeacher:
    """The frozen teacher in eval mode: converted weights from ``weights_path`` (load_clip_weights.py's output,
    read without running code unless ``trust_pickle``; its size read from the shapes, and any ``kwargs`` given
    must agree), or random weights of the size ``kwargs`` give (default ViT-B/16 at 224) when it is None."""
    if weights_path is None:
        return weights_file.frozen(CLIPTeacher(**{**VIT_B_16, **kwargs}))
    state_dict = _read_weights(weights_path, trust_pickle)
    found = clip_kwargs_from_state_dict(state_dict, weights_path)
    unknown = set(kwargs) - set(found)
    if unknown:
        raise TypeError(f'unknown CLIPTeacher arguments: {sorted(unknown)}')
    differing = {key: value for key, value in kwargs.items() if found[key] != value}
    if differing:
        raise CLIPWeightsError(f'{weights_path} holds a CLIP encoder with '
                               f'{", ".join(f"{key}={found[key]}" for key in differing)}, not '
                               f'{", ".join(f"{key}={value}" for key, value in differing.items())}')
    model = CLIPTeacher(**found)
    check_state_dict_fits(state_dict, model, weights_path)
    model.set_state_dict(state_dict)
    return weights_file.frozen(model)


def clip_file_sizes(weights_path: str, *, trust_pickle: bool = False) -> dict:
    """The CLIPTeacher arguments of a converted file (its input resolution, patch size, output width, ...), read
    from its shapes: what a run checks before it builds anything."""
    return clip_kwargs_from_state_dict(_read_weights(weights_path, trust_pickle), weights_path)


def _read_weights(weights_path: str, trust_pickle: bool) -> dict:
    return weights_file.read_state_dict(weights_path, trust_pickle=trust_pickle, what='CLIP weights',
                                        error=CLIPWeightsError,
                                        converter_hint="convert OpenAI's ViT-B-16.pt with load_clip_weights.py")
