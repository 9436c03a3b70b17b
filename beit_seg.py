"""BEiT + UperNet for semantic segmentation, as unilm's beit/semantic_segmentation builds it on mmseg 0.11.

Plain Paddle layers with the parameter names of unilm's released checkpoints: ``backbone.*`` (our ``Beit`` names,
which are unilm's, plus ``fpn1``-``fpn4``), ``decode_head.*`` (UperHead) and ``auxiliary_head.*`` (FCNHead). Torch's
BatchNorm buffers ``running_mean`` / ``running_var`` are Paddle's ``_mean`` / ``_variance``. unilm's patch-8 variant
of the fpn is not built: every patch size gets the patch-16 one (x4, x2, x1, x1/2 of the patch grid).
"""
import math
from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from beit import Beit, CheckpointMismatchError, adapt_state_dict, compiled_if_asked, encoder_kwargs
from config import ConfigError, named_origin
from cpu_runtime import use_fast_blas_kernels

NUM_LEVELS = 4  # feature maps the fpn makes; unilm takes them from 4 blocks
BN_MOMENTUM = 0.9  # Paddle keeps momentum * running + (1 - momentum) * batch: torch's (and mmcv's) 0.1
BN_EPSILON = 1e-5  # torch's BatchNorm default, which mmcv's ConvModule and unilm's fpn1 use
BACKBONE_PREFIX = 'backbone.'


def batch_norm(channels: int) -> nn.BatchNorm2D:
    return nn.BatchNorm2D(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


def resize(x: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """mmseg's resize as UperHead calls it: bilinear, align_corners False (Paddle's align_mode 0 is torch's)."""
    return F.interpolate(x, size=list(size), mode='bilinear', align_corners=False)


def _torch_default_init(layer: nn.Layer) -> None:
    """torch's default (Transpose)Conv init, U(-b, b) with b = 1/sqrt(weight.shape[1] * kernel area): unilm leaves
    the fpn's ConvTranspose2d layers at it."""
    bound = 1.0 / math.sqrt(np.prod(layer.weight.shape[1:]))
    nn.initializer.Uniform(-bound, bound)(layer.weight)
    nn.initializer.Uniform(-bound, bound)(layer.bias)


def _conv_transpose_x2(channels: int) -> nn.Conv2DTranspose:
    layer = nn.Conv2DTranspose(channels, channels, kernel_size=2, stride=2)
    _torch_default_init(layer)
    return layer


class ConvModule(nn.Layer):
    """mmcv's ConvModule with BN and ReLU: conv without bias, ``bn``, ReLU; mmcv's init (Kaiming normal over the
    fan-out for ReLU, BN weight 1 and bias 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        fan_out = out_channels * kernel_size * kernel_size
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias_attr=False,
                              weight_attr=nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_out)))
        self.bn = batch_norm(out_channels)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SegBackbone(Beit):
    """unilm's segmentation BEiT: the encoder without pooling, norm or head, whose blocks ``out_indices`` (0-based,
    increasing) give NCHW maps of the patch tokens (no final norm) that fpn1-fpn4 bring to 4x, 2x, 1x and 1/2x the
    patch grid."""

    def __init__(self, *, out_indices: Sequence[int], **encoder_args):
        super().__init__(num_classes=0, use_mean_pooling=True, **encoder_args)
        self.fc_norm = None  # unilm's backbone has no pooling: no parameter without a gradient
        depth = len(self.blocks)
        if (len(out_indices) != NUM_LEVELS or list(out_indices) != sorted(set(out_indices))
                or not all(0 <= index < depth for index in out_indices)):
            raise ValueError(f'out_indices must be {NUM_LEVELS} increasing block indices in [0, {depth - 1}], '
                             f'got {list(out_indices)}')
        self.out_indices = list(out_indices)
        dim = self.embed_dim
        self.fpn1 = nn.Sequential(_conv_transpose_x2(dim), batch_norm(dim), nn.GELU(), _conv_transpose_x2(dim))
        self.fpn2 = nn.Sequential(_conv_transpose_x2(dim))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2D(kernel_size=2, stride=2)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """Images [B, C, H, W] -> 4 maps [B, D, h, w], h = 4, 2, 1 and 1/2 times H / patch."""
        maps = self.forward_intermediates(x, indices=self.out_indices, stop_early=True, intermediates_only=True)
        return [fpn(features) for fpn, features in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class DecodeHead(nn.Layer):
    """What mmseg's BaseDecodeHead adds to a head: Dropout2d, then the 1x1 classifier ``conv_seg`` (init N(0, 0.01),
    bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2D(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2D(channels, num_classes, 1, weight_attr=nn.initializer.Normal(0.0, 0.01),
                                  bias_attr=nn.initializer.Constant(0.0))

    def classify(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv_seg(self.dropout(x))


class UperHead(DecodeHead):
    """UPerNet's head: a pyramid pooling module on the last level, an FPN over the four, all fused at level 0."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, pool_scales: Sequence[int],
                 dropout: float):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.LayerList([
            nn.Sequential(nn.AdaptiveAvgPool2D(scale), ConvModule(in_channels, channels, 1)) for scale in pool_scales])
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.LayerList([ConvModule(in_channels, channels, 1) for _ in range(NUM_LEVELS - 1)])
        self.fpn_convs = nn.LayerList([ConvModule(channels, channels, 3) for _ in range(NUM_LEVELS - 1)])
        self.fpn_bottleneck = ConvModule(NUM_LEVELS * channels, channels, 3)

    def psp_forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = [resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(paddle.concat([x, *pooled], axis=1))

    def forward(self, levels: Sequence[paddle.Tensor]) -> paddle.Tensor:
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, levels)]
        laterals.append(self.psp_forward(levels[-1]))
        for i in range(NUM_LEVELS - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(out, size) for out in outs[1:]]
        return self.classify(self.fpn_bottleneck(paddle.concat(outs, axis=1)))


class FCNHead(DecodeHead):
    """mmseg's FCNHead as unilm's auxiliary head: one 3x3 ConvModule, no input concatenation, on ``in_index``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, dropout: float, in_index: int = 2):
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, levels: Sequence[paddle.Tensor]) -> paddle.Tensor:
        return self.classify(self.convs(levels[self.in_index]))


class BeitUperNet(nn.Layer):
    """The segmentor: SegBackbone, UperHead (``decode_head``) and the auxiliary FCNHead (``auxiliary_head``).

    ``forward(images)`` gives, in training, (main logits, auxiliary logits); in eval, the main logits alone. The
    main logits are at level 0 (4x the patch grid: 1/4 of the input for 16-pixel patches), the auxiliary ones at
    level 2 (the patch grid); the loss resizes them to the labels.
    """

    def __init__(self, *, num_classes: int, out_indices: Sequence[int], channels: int, pool_scales: Sequence[int],
                 aux_channels: int, dropout: float, **encoder_args):
        super().__init__()
        self.backbone = SegBackbone(out_indices=out_indices, **encoder_args)
        dim = self.backbone.embed_dim
        self.decode_head = UperHead(dim, channels, num_classes, pool_scales=pool_scales, dropout=dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout=dropout)

    def forward_heads(self, images: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(main logits, auxiliary logits) in any mode."""
        levels = self.backbone(images)
        return self.decode_head(levels), self.auxiliary_head(levels)

    def forward(self, images: paddle.Tensor):
        if self.training:
            return self.forward_heads(images)
        return self.decode_head(self.backbone(images))

    def fit_pretrained(self, state_dict: dict, rel_pos_interp: str = 'cubic', complete: bool = False
                       ) -> tuple[dict, list]:
        """How -pretrained fits this model (checkpoint.load_pretrained asks the model when it can): a segmentation
        state dict (``backbone.*`` names) as fit_segmentor_state_dict fits it; a classification or pre-training
        one into the backbone (fit_backbone_state_dict), the heads keeping their init, which ``complete``
        (evaluation, prediction) refuses."""
        if any(name.startswith(BACKBONE_PREFIX) for name in state_dict):
            return fit_segmentor_state_dict(state_dict, self, rel_pos_interp, complete)
        if complete:
            raise CheckpointMismatchError('the file holds no segmentation weights (no backbone.* names): evaluation '
                                          'needs a segmentor\'s (a main_segment.py checkpoint, or a conversion by '
                                          'load_seg_weights.py); a classification or pre-training file only starts '
                                          'training')
        fitted, notes = fit_backbone_state_dict(state_dict, self.backbone, rel_pos_interp)
        return {BACKBONE_PREFIX + name: value for name, value in fitted.items()}, notes


def _check_seg_config(config) -> None:
    seg = config.SEG
    depth = config.MODEL.DEPTH
    indices = list(seg.OUT_INDICES)
    if len(indices) != NUM_LEVELS or indices != sorted(set(indices)) or not all(0 <= i < depth for i in indices):
        raise ConfigError(f'{named_origin(config, "SEG.OUT_INDICES", "MODEL.DEPTH")}SEG.OUT_INDICES must be '
                          f'{NUM_LEVELS} increasing block indices in [0, {depth - 1}] (MODEL.DEPTH {depth}), '
                          f'got {indices}')
    for name in ('NUM_CLASSES', 'CHANNELS', 'AUX_CHANNELS'):
        if not seg[name] > 0:
            raise ConfigError(f'{named_origin(config, "SEG." + name)}SEG.{name} must be positive, got {seg[name]}')
    if not seg.POOL_SCALES or not all(scale > 0 for scale in seg.POOL_SCALES):
        raise ConfigError(f'{named_origin(config, "SEG.POOL_SCALES")}SEG.POOL_SCALES must be positive sizes, '
                          f'got {list(seg.POOL_SCALES)}')
    if not 0.0 <= seg.DROPOUT < 1.0:
        raise ConfigError(f'{named_origin(config, "SEG.DROPOUT")}SEG.DROPOUT must lie in [0, 1), got {seg.DROPOUT}')


def build_beit_upernet(config) -> BeitUperNet:
    """The segmentor of ``config``: the backbone from MODEL.* at the crop DATA.IMAGE_SIZE, the heads from SEG.*."""
    _check_seg_config(config)
    use_fast_blas_kernels()
    seg = config.SEG
    model = BeitUperNet(num_classes=seg.NUM_CLASSES, out_indices=list(seg.OUT_INDICES), channels=seg.CHANNELS,
                        pool_scales=list(seg.POOL_SCALES), aux_channels=seg.AUX_CHANNELS, dropout=seg.DROPOUT,
                        **encoder_kwargs(config))
    return compiled_if_asked(model, config)


# What a classification or pre-training checkpoint holds that the segmentation backbone has no place for.
_NOT_IN_BACKBONE = ('head.', 'fc_norm.', 'norm.')


def fit_backbone_state_dict(state_dict: dict, backbone: SegBackbone, rel_pos_interp: str = 'cubic'
                            ) -> tuple[dict, list]:
    """Fit a classification or pre-training state dict (our Paddle layout, name -> numpy array) to ``backbone``, as
    beit.adapt_state_dict fits it to a classifier: bias tables resampled to the crop's grid, a shared table spread
    to every block, MIM-only tensors dropped; the pooling, norm and head are dropped too, and the fpn keeps its
    fresh init. Returns the backbone's state dict (its own names) and notes for the log."""
    dropped = sorted(name for name in state_dict if name.startswith(_NOT_IN_BACKBONE))
    source = {name: value for name, value in state_dict.items() if name not in dropped}
    fresh = {name: tensor.numpy() for name, tensor in backbone.state_dict().items() if name.startswith('fpn')}
    overlap = sorted(set(fresh) & set(source))
    if overlap:
        raise CheckpointMismatchError(f'{overlap[0]}: the state dict holds fpn weights; this fits classification '
                                      'and pre-training checkpoints, not segmentation ones')
    fitted, notes = adapt_state_dict({**source, **fresh}, backbone, rel_pos_interp)
    if dropped:
        notes.append(f'not used by the segmentation backbone: {", ".join(dropped)}')
    notes.append(f'freshly initialised: the fpn ({len(fresh)} tensors), decode_head and auxiliary_head')
    return fitted, notes


_CLASSIFIERS = ('decode_head.conv_seg.weight', 'decode_head.conv_seg.bias', 'auxiliary_head.conv_seg.weight',
                'auxiliary_head.conv_seg.bias')


def fit_segmentor_state_dict(state_dict: dict, model: BeitUperNet, rel_pos_interp: str = 'cubic',
                             complete: bool = False) -> tuple[dict, list]:
    """Fit a segmentor's state dict (our layout) to ``model``: the backbone as beit.adapt_state_dict fits an
    encoder (bias tables resampled to this crop's grid), the heads tensor for tensor. Classifiers of another class
    count keep their fresh init to start training (notes say so); with ``complete`` nothing may be missing."""
    prefix = BACKBONE_PREFIX
    backbone, notes = adapt_state_dict({name[len(prefix):]: value for name, value in state_dict.items()
                                        if name.startswith(prefix)}, model.backbone, rel_pos_interp, complete)
    fitted = {prefix + name: value for name, value in backbone.items()}
    target = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if not name.startswith(prefix)}
    heads = {name: np.asarray(value) for name, value in state_dict.items() if not name.startswith(prefix)}
    unexpected = sorted(set(heads) - set(target))
    missing = sorted(set(target) - set(heads))
    reshaped = sorted(name for name in set(heads) & set(target) if heads[name].shape != target[name])
    fresh = [] if complete else [name for name in reshaped if name in _CLASSIFIERS]
    problems = [f'{label}: {", ".join(names[:4])}' for label, names in (
        ('not in the model', unexpected), ('missing', missing),
        ('other shape', [f'{name} {list(heads[name].shape)} (model {list(target[name])})'
                         for name in reshaped if name not in fresh])) if names]
    if problems:
        raise CheckpointMismatchError('the segmentation heads do not fit the model (SEG.NUM_CLASSES, CHANNELS, '
                                      f'AUX_CHANNELS, POOL_SCALES?): {"; ".join(problems)}')
    fitted.update({name: value for name, value in heads.items() if name not in fresh})
    if fresh:
        notes.append(f'freshly initialised (another class count in the file): {", ".join(fresh)}')
    return fitted, notes


def load_backbone_weights(model: BeitUperNet, state_dict: dict, rel_pos_interp: str = 'cubic') -> list:
    """Load a classification or pre-training state dict into ``model.backbone`` (fit_backbone_state_dict); returns
    the notes for the log."""
    fitted, notes = fit_backbone_state_dict(state_dict, model.backbone, rel_pos_interp)
    model.backbone.set_state_dict({name: paddle.to_tensor(value) for name, value in fitted.items()})
    return notes


def convert_sync_batchnorm(model: nn.Layer) -> nn.Layer:
    """``model`` with every BatchNorm2D replaced by a SyncBatchNorm holding the same parameters, running statistics,
    momentum and epsilon (Paddle's SyncBatchNorm.convert_sync_batchnorm), as unilm's SyncBN on several GPUs.

    Only for a run of several GPU processes: Paddle 3.3.1 registers no CPU kernel for ``sync_batch_norm`` (in train
    or eval mode, the forward fails with "The kernel `sync_batch_norm` is not registered"), so a CPU run keeps
    BatchNorm2D.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
