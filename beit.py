"""BEiT fine-tuning model (arXiv 2106.08254) with unilm/timm parameter names.

Parameter names follow the official checkpoints so that converted PyTorch weights load with
``model.set_state_dict``; only Linear weights differ in layout (Paddle stores them [in, out]).
"""
import collections
import math
import operator
from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from cpu_runtime import use_fast_blas_kernels
from errors import BadInputError
from pos_resample import NUM_CLS_RELATIONS, resample_abs_pos_embed, resample_rel_pos_table

LAYER_NORM_EPS = 1e-6
OUTPUT_FORMATS = ('NCHW', 'NLC')  # of forward_intermediates, as timm's

trunc_normal_ = nn.initializer.TruncatedNormal(std=0.02)
zeros_ = nn.initializer.Constant(0.0)


def on_accelerator(x: paddle.Tensor) -> bool:
    """Where Paddle has fused attention kernels (GPU); on CPU its scaled_dot_product_attention is a slower
    composition of ops than Attention's explicit path."""
    return x.place.is_gpu_place()


def fused_attention_applies(qkv: paddle.Tensor, bias: paddle.Tensor | None) -> bool:
    """Whether scaled_dot_product_attention computes what the explicit path does, gradients included.

    Under AMP on Ampere or newer, Paddle 3.x sends it to the flash kernel, whose backward gives the mask no
    gradient: a bias that is being trained takes the explicit path. Static graphs (export, TO_STATIC) take it
    too, so a traced program does not depend on the device it was traced on.
    """
    return paddle.in_dynamic_mode() and on_accelerator(qkv) and (bias is None or bias.stop_gradient)


def resolve_block_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's choice of blocks as sorted absolute indices: None = all, an int n = the last n, else block indices,
    negative ones counting from the end. A choice outside the model is an error, never an empty result."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f'indices={indices} asks for the last {indices} blocks; the model has 1 to {num_blocks}')
        return list(range(num_blocks - indices, num_blocks))
    resolved = set()
    for index in indices:
        absolute = operator.index(index) + (num_blocks if index < 0 else 0)
        if not 0 <= absolute < num_blocks:
            raise ValueError(f'block index {index} is out of range for {num_blocks} blocks '
                             f'(0 to {num_blocks - 1}, or -{num_blocks} to -1)')
        resolved.add(absolute)
    if not resolved:
        raise ValueError('indices is empty: give at least one block index, an int n for the last n, or None for all')
    return sorted(resolved)


def relative_position_table_size(grid: tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + NUM_CLS_RELATIONS


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """(N+1)x(N+1) row indices into a bias table; token 0 is the cls token."""
    height, width = grid
    coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing='ij')).reshape(2, -1)
    delta = coords[:, :, None] - coords[:, None, :]
    num_rows = relative_position_table_size(grid)
    index = np.empty((height * width + 1,) * 2, dtype='int64')
    index[1:, 1:] = (delta[0] + height - 1) * (2 * width - 1) + (delta[1] + width - 1)
    index[0, :] = num_rows - 3
    index[:, 0] = num_rows - 2
    index[0, 0] = num_rows - 1
    return index


def gather_relative_position_bias(table: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """Look the table up for every token pair: [1, heads, N+1, N+1], ready to add to attention logits."""
    num_tokens = math.isqrt(index.shape[0])
    bias = paddle.gather(table, index).reshape([num_tokens, num_tokens, table.shape[1]])
    return bias.transpose([2, 0, 1]).unsqueeze(0)


def _add_relative_position_table(layer: nn.Layer, grid: tuple[int, int], num_heads: int) -> None:
    """Give ``layer`` the official ``relative_position_bias_table`` parameter and its index."""
    layer.relative_position_bias_table = layer.create_parameter(
        [relative_position_table_size(grid), num_heads], default_initializer=zeros_)
    # A constant lookup, never trained, saved or averaged: kept out of the state dict.
    layer.register_buffer('relative_position_index',
                          paddle.to_tensor(relative_position_index(grid).reshape(-1)), persistable=False)


class SharedRelativePositionBias(nn.Layer):
    """One bias table for all blocks (pre-training checkpoints use it)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        _add_relative_position_table(self, grid, num_heads)

    def forward(self) -> paddle.Tensor:
        return gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)


class DropPath(nn.Layer):
    """Stochastic depth: drops the whole residual branch per sample. The keep mask and the scaling are computed in
    float32 whatever the input's dtype: bfloat16 would round keep_prob 0.9 to 0.8984 and 1/0.9 to 1.1094."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        scale = paddle.bernoulli(paddle.full(shape, keep_prob, dtype='float32')) / keep_prob
        return (x.astype('float32') * scale).astype(x.dtype)


class PatchEmbed(nn.Layer):
    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not a multiple of patch size {patch_size}')
        self.img_size = img_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f'input is {tuple(x.shape[2:])} pixels, the model was built for '
                             f'{self.img_size}x{self.img_size} (DATA.IMAGE_SIZE)')
        return self.proj(x).flatten(2).transpose([0, 2, 1])


class Attention(nn.Layer):
    """Multi-head self-attention with BEiT's q/v biases and, given a ``grid``, its own relative position bias.

    ``drop_rate`` drops the projected output, ``attn_drop_rate`` the attention weights (the names and order of the
    rates are the same in Mlp, Block and BeitEncoder). The math is written with three ops, ``_linear``,
    ``_permute`` and ``_add_bias``, which a subclass may replace by other implementations of the same functions.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, drop_rate: float, attn_drop_rate: float,
                 grid: tuple[int, int] | None, fused_attn: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embedding dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias_attr=False)
        if qkv_bias:  # BEiT biases q and v only; k stays bias-free
            self.q_bias = self.create_parameter([dim], default_initializer=zeros_)
            self.v_bias = self.create_parameter([dim], default_initializer=zeros_)
        else:
            self.q_bias = self.v_bias = None
        self.relative_position_bias_table = None
        if grid:
            _add_relative_position_table(self, grid, num_heads)
        self.attn_drop_rate = attn_drop_rate
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop_rate)

    @staticmethod
    def _linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def _permute(x: paddle.Tensor, perm: list[int]) -> paddle.Tensor:
        return x.transpose(perm)

    @staticmethod
    def _add_bias(logits: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
        """``logits`` [B, heads, N, N] + ``bias`` [1, heads, N, N]."""
        return logits + bias

    def _qkv_bias(self) -> paddle.Tensor | None:
        if self.q_bias is None:
            return None
        return paddle.concat([self.q_bias, paddle.zeros(self.v_bias.shape, self.v_bias.dtype), self.v_bias])

    def _attention_bias(self, shared_bias: paddle.Tensor | None) -> paddle.Tensor | None:
        bias = None
        if self.relative_position_bias_table is not None:
            bias = gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        if shared_bias is not None:
            bias = shared_bias if bias is None else bias + shared_bias
        return bias

    def _project_qkv(self, x: paddle.Tensor) -> paddle.Tensor:
        """[B, N, dim] -> [B, N, 3, heads, head_dim]."""
        qkv = self._linear(x, self.qkv.weight, self._qkv_bias())
        return qkv.reshape([0, 0, 3, self.num_heads, self.head_dim])

    def forward(self, x: paddle.Tensor, shared_bias: paddle.Tensor | None = None) -> paddle.Tensor:
        qkv = self._project_qkv(x)
        bias = self._attention_bias(shared_bias)
        if bias is not None:
            bias = bias.astype(qkv.dtype)
        if self.fused and fused_attention_applies(qkv, bias):
            out = self._fused_attention(qkv, bias)
        else:
            out = self._explicit_attention(qkv, bias)
        return self.proj_drop(self.proj(out.reshape([0, 0, -1])))

    def _dropout_rate(self) -> float:
        return self.attn_drop_rate if self.training else 0.0

    def _fused_attention(self, qkv: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
        """Paddle's scaled_dot_product_attention ([B, N, heads, head_dim] layout). The flash kernel takes a mask
        of q's dtype with one row per sample ([B, heads, N, N]), and sdpa expands only 2-D and 3-D masks."""
        q, k, v = paddle.unbind(qkv, axis=2)
        if bias is not None:
            bias = bias.expand([q.shape[0], -1, -1, -1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self._dropout_rate(),
                                              training=self.training)

    def _explicit_attention(self, qkv: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
        """Softmax(q k^T * scale + bias) v with two GEMMs, in [B, heads, N, head_dim] layout.

        The scale goes on the logits: in a static graph (export, TO_STATIC) that is the pattern Paddle
        Inference's oneDNN passes fuse (measured against scaling q: docs/cpu_speed.md).
        """
        q, k, v = paddle.unbind(self._permute(qkv, [2, 0, 3, 1, 4]), axis=0)
        logits = paddle.matmul(q, k, transpose_y=True) * self.scale
        if bias is not None:
            logits = self._add_bias(logits, bias)
        weights = F.dropout(F.softmax(logits, axis=-1), self._dropout_rate(), training=self.training)
        return self._permute(paddle.matmul(weights, v), [0, 2, 1, 3])


class Mlp(nn.Layer):
    def __init__(self, dim: int, hidden_dim: int, *, drop_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Layer):
    """Pre-norm transformer block; ``drop_path_rate`` is this block's own stochastic depth rate."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float, init_values: float | None,
                 grid: tuple[int, int] | None, fused_attn: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                              grid=grid, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, epsilon=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate=drop_rate)
        if not init_values:  # 0 or None: layer scale off, as unilm's --layer_scale_init_value 0 and timm
            self.gamma_1 = self.gamma_2 = None
        else:
            layer_scale = nn.initializer.Constant(init_values)
            self.gamma_1 = self.create_parameter([dim], default_initializer=layer_scale)
            self.gamma_2 = self.create_parameter([dim], default_initializer=layer_scale)

    @staticmethod
    def _layer_scale(x: paddle.Tensor, gamma: paddle.Tensor | None) -> paddle.Tensor:
        return x if gamma is None else x * gamma

    def forward(self, x: paddle.Tensor, shared_bias: paddle.Tensor | None = None) -> paddle.Tensor:
        x = x + self.drop_path(self._layer_scale(self.attn(self.norm1(x), shared_bias), self.gamma_1))
        return x + self.drop_path(self._layer_scale(self.mlp(self.norm2(x)), self.gamma_2))


class BeitEncoder(nn.Layer):
    """What the fine-tuning and the pre-training model share: patch embedding, cls token, position embedding
    or biases, the blocks and the final ``norm`` (LayerNorm, or the identity with ``final_norm`` off).

    Subclasses add their outputs, then call ``_init_weights`` once every layer exists.
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool, drop_rate: float, attn_drop_rate: float, drop_path_rate: float,
                 init_values: float | None, use_abs_pos_emb: bool, use_rel_pos_bias: bool,
                 use_shared_rel_pos_bias: bool, final_norm: bool, fused_attn: bool, recompute: bool):
        super().__init__()
        self.embed_dim = embed_dim
        self.recompute = recompute
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        grid = self.patch_embed.grid
        num_tokens = grid[0] * grid[1] + 1
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=trunc_normal_)
        self.pos_embed = (self.create_parameter([1, num_tokens, embed_dim], default_initializer=trunc_normal_)
                          if use_abs_pos_emb else None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = SharedRelativePositionBias(grid, num_heads) if use_shared_rel_pos_bias else None
        drop_path_rates = np.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                  attn_drop_rate=attn_drop_rate, drop_path_rate=rate, init_values=init_values,
                  grid=grid if use_rel_pos_bias else None, fused_attn=fused_attn)
            for rate in drop_path_rates])
        self.norm = nn.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS) if final_norm else nn.Identity()

    def _init_weights(self) -> None:
        """unilm's initialisation: trunc-normal Linears (every output layer too), depth-scaled residual outputs."""
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight)
                if layer.bias is not None:
                    zeros_(layer.bias)
            elif isinstance(layer, nn.Conv2D):  # PyTorch's default Conv2d init
                bound = 1.0 / math.sqrt(np.prod(layer.weight.shape[1:]))
                nn.initializer.Uniform(-bound, bound)(layer.weight)
                nn.initializer.Uniform(-bound, bound)(layer.bias)
        for layer_id, block in enumerate(self.blocks, start=1):
            for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
                weight.set_value(weight / math.sqrt(2.0 * layer_id))

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    def encode(self, patch_tokens: paddle.Tensor) -> paddle.Tensor:
        """Patch tokens [B, N, D] -> all tokens after the last block (and ``norm``), [B, N+1, D]; token 0 is cls."""
        return self.norm(self.run_blocks(patch_tokens)[0])

    def run_blocks(self, patch_tokens: paddle.Tensor, taken: Sequence[int] = (),
                   num_blocks: int | None = None) -> tuple[paddle.Tensor, list[paddle.Tensor]]:
        """Patch tokens [B, N, D] through the first ``num_blocks`` blocks (all by default): the tokens [B, N+1, D]
        after the last of them (before ``norm``) and, in block order, the outputs of the blocks in ``taken``."""
        x = paddle.concat([self.cls_token.expand([patch_tokens.shape[0], -1, -1]).astype(patch_tokens.dtype),
                           patch_tokens], axis=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        outputs = []
        for index, block in enumerate(list(self.blocks)[:num_blocks]):
            if self.recompute and self.training:  # non-reentrant: the PyLayer version breaks DataParallel's reducer
                x = recompute(block, x, shared_bias, use_reentrant=False)
            else:
                x = block(x, shared_bias)
            if index in taken:
                outputs.append(x)
        return x, outputs


class Beit(BeitEncoder):
    """BEiT encoder with a classification head.

    ``use_mean_pooling`` averages the patch tokens and applies ``fc_norm`` (the zoo default; ``norm``
    is then the identity); otherwise the cls token after ``norm`` is classified.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: float | None = 0.1, use_abs_pos_emb: bool = False,
                 use_rel_pos_bias: bool = True, use_shared_rel_pos_bias: bool = False,
                 use_mean_pooling: bool = True, init_scale: float = 0.001,
                 fused_attn: bool = False, recompute: bool = False):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, init_values=init_values,
                         use_abs_pos_emb=use_abs_pos_emb, use_rel_pos_bias=use_rel_pos_bias,
                         use_shared_rel_pos_bias=use_shared_rel_pos_bias, final_norm=not use_mean_pooling,
                         fused_attn=fused_attn, recompute=recompute)
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if isinstance(self.head, nn.Linear):  # a tiny head: the pre-trained features dominate at first
            self.head.weight.set_value(self.head.weight * init_scale)
            self.head.bias.set_value(self.head.bias * init_scale)

    def forward_tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        """All tokens after the last block (and ``norm``), shape [B, N+1, D]."""
        return self.encode(self.patch_embed(x))

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Pre-logits features [B, D]: normalised mean of the patch tokens, or the cls token."""
        x = self.forward_tokens(x)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(axis=1))
        return x[:, 0]

    def forward_head(self, features: paddle.Tensor) -> paddle.Tensor:
        return self.head(features)

    def forward_intermediates(self, x: paddle.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """The outputs of chosen blocks, for dense tasks and linear probing, with timm's arguments and results.

        ``indices``: None for every block, an int n for the last n, or block indices (negative from the end);
        the outputs come in block order, once each. ``norm`` applies the final ``norm`` (the identity with mean
        pooling, as in timm). Each output drops the cls token: 'NLC' gives the patch tokens [B, N, D], 'NCHW'
        the map [B, D, H/p, W/p]; ``return_prefix_tokens`` pairs it with its cls token [B, 1, D].
        ``stop_early`` skips the blocks after the last one chosen. Returns the list alone with
        ``intermediates_only``, else (``norm`` of the tokens [B, N+1, D] after the last block run, the list).
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f'output_fmt must be one of {list(OUTPUT_FORMATS)}, got {output_fmt!r}')
        taken = resolve_block_indices(len(self.blocks), indices)
        x, outputs = self.run_blocks(self.patch_embed(x), taken, taken[-1] + 1 if stop_early else None)
        if norm:
            outputs = [self.norm(tokens) for tokens in outputs]
        intermediates = [self._patch_features(tokens, output_fmt) for tokens in outputs]
        if return_prefix_tokens:
            intermediates = [(features, tokens[:, :1]) for features, tokens in zip(intermediates, outputs)]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def _patch_features(self, tokens: paddle.Tensor, output_fmt: str) -> paddle.Tensor:
        """All tokens [B, N+1, D] -> the patch tokens [B, N, D] ('NLC') or their map [B, D, H/p, W/p] ('NCHW')."""
        patches = tokens[:, 1:]
        if output_fmt == 'NLC':
            return patches
        height, width = self.patch_embed.grid
        # the width as a number: traced with a dynamic batch, a -1 here would leave the channels unknown to the
        # layers after it (a segmentor's fpn cannot be exported then)
        return patches.reshape([0, height, width, patches.shape[-1]]).transpose([0, 3, 1, 2])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_head(self.forward_features(x))


def encoder_kwargs(config) -> dict:
    """The ``BeitEncoder`` arguments that ``config`` describes (``config.MODEL`` plus the input from ``DATA``)."""
    model_cfg = config.MODEL
    return dict(
        img_size=config.DATA.IMAGE_SIZE,
        patch_size=model_cfg.PATCH_SIZE,
        in_chans=config.DATA.IMAGE_CHANNELS,
        embed_dim=model_cfg.EMBED_DIM,
        depth=model_cfg.DEPTH,
        num_heads=model_cfg.NUM_HEADS,
        mlp_ratio=model_cfg.MLP_RATIO,
        qkv_bias=model_cfg.QKV_BIAS,
        drop_rate=model_cfg.DROPOUT,
        attn_drop_rate=model_cfg.ATTENTION_DROPOUT,
        drop_path_rate=model_cfg.DROPPATH,
        init_values=model_cfg.INIT_VALUES,
        use_abs_pos_emb=model_cfg.USE_ABS_POS_EMB,
        use_rel_pos_bias=model_cfg.USE_REL_POS_BIAS,
        use_shared_rel_pos_bias=model_cfg.USE_SHARED_REL_POS_BIAS,
        fused_attn=model_cfg.FUSED_ATTN,
        recompute=model_cfg.RECOMPUTE,
    )


def compiled_if_asked(model: nn.Layer, config) -> nn.Layer:
    """``model`` compiled by ``paddle.jit.to_static`` (whole graph) when MODEL.TO_STATIC is set."""
    return paddle.jit.to_static(model, full_graph=True) if config.MODEL.TO_STATIC else model


def build_beit(config) -> Beit:
    """The fine-tuning model described by ``config.MODEL`` (plus the input size and channels from ``config.DATA``),
    with cpu_runtime's BLAS kernel choice made before the process's first GEMM."""
    use_fast_blas_kernels()
    model_cfg = config.MODEL
    return compiled_if_asked(Beit(num_classes=model_cfg.NUM_CLASSES, use_mean_pooling=model_cfg.USE_MEAN_POOLING,
                                  init_scale=model_cfg.INIT_SCALE, **encoder_kwargs(config)), config)


def layer_id_for_lr_decay(param_name: str, depth: int) -> int:
    """unilm's layer id: embeddings 0, block i -> i+1, everything after the blocks depth+1."""
    if param_name in ('cls_token', 'mask_token', 'pos_embed') or param_name.startswith('patch_embed.'):
        return 0
    if param_name.startswith('blocks.'):
        return int(param_name.split('.')[1]) + 1
    return depth + 1


def lr_scale_for_param(param_name: str, depth: int, layer_decay: float) -> float:
    return layer_decay ** (depth + 1 - layer_id_for_lr_decay(param_name, depth))


class CheckpointMismatchError(BadInputError):
    """A state dict that cannot be made to fit the model."""


# Tensors that only an old buffer layout (silently) or the pre-training models (named in a note: v1's mask token
# and lm head, v2's CLS branch cls_pt_layers, cls_pt_norm, cls_pt_lm_head) carry: dropped where the model has no place.
_DROPPABLE_SUFFIXES = ('relative_position_index',)
_PRETRAINING_PREFIXES = ('mask_token', 'lm_head.', 'cls_pt_')


def adapt_state_dict(state_dict: dict, model: BeitEncoder, rel_pos_interp: str = 'cubic',
                     complete: bool = False) -> tuple[dict, list]:
    """Fit a Paddle-layout state dict (name -> numpy array) to ``model``, a fine-tuning or pre-training BEiT.

    Copies a shared relative position bias into every block that needs one, resamples bias tables and
    the absolute position embedding to the model's grid, drops MIM-only tensors the model has no place for
    and, to start fine-tuning, a head of another class count (and lets a missing head or fc_norm keep its
    fresh init). With ``complete`` (evaluation, prediction, export) every model tensor must come from the
    checkpoint: those cases raise. Returns the fitted dict and human-readable notes; raises
    CheckpointMismatchError when the checkpoint describes another architecture.
    """
    target = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    source = {name: np.asarray(value) for name, value in state_dict.items()}
    notes = []
    _spread_shared_rel_pos_bias(source, target, notes)
    fitted, unexpected, pretraining_only = {}, [], []
    for name, value in source.items():
        if name not in target:
            if not name.endswith(_DROPPABLE_SUFFIXES):
                (pretraining_only if name.startswith(_PRETRAINING_PREFIXES) else unexpected).append(name)
            continue
        fitted[name] = _fit_tensor(name, value, target[name], rel_pos_interp, notes)
    if pretraining_only:
        groups = collections.Counter(name.split('.')[0] for name in pretraining_only)
        notes.append('dropped the pre-training-only tensors (the model has no place for them): '
                     + ', '.join(f'{group} ({count})' for group, count in groups.items()))
    _drop_mismatched_head(fitted, target, notes, complete)
    _check_complete(fitted, target, unexpected, model, notes, complete)
    return fitted, notes


def _spread_shared_rel_pos_bias(source: dict, target: dict, notes: list) -> None:
    shared_name = 'rel_pos_bias.relative_position_bias_table'
    if shared_name not in source or shared_name in target:
        return
    table = source.pop(shared_name)
    receivers = [name for name in target if name.endswith('attn.relative_position_bias_table')]
    if not receivers:
        raise CheckpointMismatchError(
            'the checkpoint has a shared relative position bias but the model has none '
            '(set MODEL.USE_REL_POS_BIAS or MODEL.USE_SHARED_REL_POS_BIAS)')
    for name in receivers:
        source.setdefault(name, table.copy())
    notes.append(f'copied the shared relative position bias into {len(receivers)} blocks')


def _fit_tensor(name: str, value: np.ndarray, shape: tuple, rel_pos_interp: str, notes: list) -> np.ndarray:
    if value.shape == shape or name.startswith('head.'):
        return value
    if name.endswith('relative_position_bias_table') and value.ndim == 2 and value.shape[1] == shape[1]:
        notes.append(f'resampled {name} from {value.shape[0]} to {shape[0]} rows ({rel_pos_interp})')
        return resample_rel_pos_table(value, _grid_of_table(shape[0]), rel_pos_interp)
    if name == 'pos_embed' and value.ndim == 3 and value.shape[2] == shape[2]:
        notes.append(f'resampled pos_embed from {value.shape[1] - 1} to {shape[1] - 1} patches (bicubic)')
        return resample_abs_pos_embed(value, _grid_of_tokens(shape[1] - 1))
    raise CheckpointMismatchError(
        f'{name}: checkpoint shape {list(value.shape)} does not fit the model shape {list(shape)}; '
        'the checkpoint was made for another architecture (check MODEL.EMBED_DIM, DEPTH, NUM_HEADS, '
        'PATCH_SIZE and the config file)')


def _grid_of_table(num_rows: int) -> tuple[int, int]:
    side = (math.isqrt(num_rows - NUM_CLS_RELATIONS) + 1) // 2
    return side, side


def _grid_of_tokens(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    return side, side


def _classes(shape: Sequence[int] | None) -> str:
    """The class count a head tensor of ``shape`` (Paddle layout: weight [D, C], bias [C]) holds."""
    return f'{shape[-1]} classes' if shape else 'no head'


def _drop_mismatched_head(fitted: dict, target: dict, notes: list, complete: bool) -> None:
    for name in ('head.weight', 'head.bias'):
        if name in fitted and fitted[name].shape != target.get(name):
            if complete:
                raise CheckpointMismatchError(
                    f'{name} {list(fitted[name].shape)} holds {_classes(fitted[name].shape)}, the model '
                    f'{_classes(target.get(name))} (MODEL.NUM_CLASSES): evaluating it would evaluate a random head; '
                    f'set MODEL.NUM_CLASSES (-num_classes) to the checkpoint\'s {_classes(fitted[name].shape)}')
            notes.append(f'dropped {name} {list(fitted.pop(name).shape)}: the model has '
                         f'{list(target[name]) if name in target else "no head"}; it keeps its fresh init')


def _check_complete(fitted: dict, target: dict, unexpected: Sequence[str], model: BeitEncoder, notes: list,
                    complete: bool) -> None:
    """Missing heads and fc_norm (a pre-training checkpoint) are fine to start fine-tuning; anything else is not."""
    uses_final_norm = not isinstance(model.norm, nn.Identity)
    harmless = [name for name in unexpected if name.startswith('norm.') and not uses_final_norm]
    unexpected = [name for name in unexpected if name not in harmless]
    if harmless:
        notes.append(f'ignored {", ".join(harmless)} (the model pools with fc_norm)')
    if unexpected:
        raise CheckpointMismatchError(
            f'{len(unexpected)} checkpoint tensors have no place in the model, e.g. {", ".join(unexpected[:5])}; '
            'the checkpoint was made for another architecture (depth, pooling or position bias options)')
    missing = [name for name in target if name not in fitted]
    fresh = [] if complete else [name for name in missing if name.startswith(('head.', 'fc_norm.'))]
    absent = [name for name in missing if name not in fresh]
    if absent:
        untrained = ' (a pre-training checkpoint has no classifier to evaluate: fine-tune it first)' if any(
            name.startswith(('head.', 'fc_norm.')) for name in absent) else ''
        raise CheckpointMismatchError(
            f'{len(absent)} model tensors are missing from the checkpoint, e.g. {", ".join(absent[:5])}{untrained}')
    if fresh:
        notes.append(f'not in the checkpoint, freshly initialised: {", ".join(fresh)}')
