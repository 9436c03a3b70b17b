"""The segmentation optimizer's rules as unilm runs them: parameter groups of its LayerDecayOptimizerConstructor
(beit/semantic_segmentation/mmcv_custom) and mmcv's poly LR schedule with linear warm-up, stepped per iteration.

unilm's constructor names parameters as the whole segmentor does (``backbone.blocks.3.attn.qkv.weight``,
``decode_head.conv_seg.bias``), and so do we. Its rules:
- layer id: ``backbone.cls_token``, ``backbone.mask_token``, ``backbone.pos_embed`` and ``backbone.patch_embed*``
  0; ``backbone.blocks.i*`` i + 1; everything else (the fpn, a shared bias table, both heads) depth + 1;
- LR scale: layer_decay ** (depth + 1 - layer id);
- no weight decay for 1-D parameters, names ending in ``.bias``, and names equal to ``pos_embed`` or ``cls_token``.
  That last test sees the prefixed names, so it never matches: unilm's segmentation runs DO decay
  ``backbone.cls_token`` and ``backbone.pos_embed`` (and, being 2-D, the relative position bias tables), and so
  do these groups.
"""
import paddle.nn as nn
from paddle.optimizer.lr import LRScheduler

from beit import layer_id_for_lr_decay
from beit_seg import BACKBONE_PREFIX
from config import ConfigError, named_origin

NO_DECAY_NAMES = ('pos_embed', 'cls_token')  # compared with the full (prefixed) name, as unilm does


def seg_layer_id(name: str, depth: int) -> int:
    """unilm's segmentation layer id of the parameter ``name`` (the classification rule on the backbone's names)."""
    if name.startswith(BACKBONE_PREFIX):
        return layer_id_for_lr_decay(name[len(BACKBONE_PREFIX):], depth)
    return depth + 1


def decays_weight(name: str, ndim: int) -> bool:
    return not (ndim == 1 or name.endswith('.bias') or name in NO_DECAY_NAMES)


def seg_param_settings(model: nn.Layer, *, weight_decay: float, layer_decay: float) -> dict:
    """{name: {'layer_id', 'lr_scale', 'weight_decay'}} for every trainable parameter of the segmentor."""
    depth = model.backbone.get_num_layers()
    settings = {}
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        layer_id = seg_layer_id(name, depth)
        settings[name] = {'layer_id': layer_id, 'lr_scale': layer_decay ** (depth + 1 - layer_id),
                          'weight_decay': weight_decay if decays_weight(name, param.ndim) else 0.0}
    return settings


def seg_param_groups(model: nn.Layer, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """Paddle parameter groups, one per unilm group (``layer_<id>_decay`` / ``layer_<id>_no_decay``), in the order
    unilm makes them: ``learning_rate`` is the LR scale (Paddle multiplies it into the scheduled LR of each of the
    group's parameters) and ``weight_decay`` the group's AdamW coefficient. Paddle clips gradients per group: a
    global-norm clip over these groups is not global (unilm's segmentation runs clip nothing)."""
    params = dict(model.named_parameters())
    groups = {}
    for name, setting in seg_param_settings(model, weight_decay=weight_decay, layer_decay=layer_decay).items():
        key = f'layer_{setting["layer_id"]}_{"decay" if setting["weight_decay"] else "no_decay"}'
        group = groups.setdefault(key, {'params': [], 'learning_rate': setting['lr_scale'],
                                        'weight_decay': setting['weight_decay']})
        group['params'].append(params[name])
    return list(groups.values())


def poly_warmup_lr(iteration: int, *, base_lr: float, max_iters: int, warmup_iters: int, warmup_ratio: float,
                   power: float) -> float:
    """mmcv's PolyLrUpdaterHook (min_lr 0) with 'linear' warm-up, for the iteration ``iteration`` (0-based, the
    runner's ``iter`` before it runs): the poly LR base_lr * (1 - iteration / max_iters) ** power, during the
    warm-up times 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio). Past max_iters it stays 0."""
    lr = base_lr * (1.0 - min(iteration, max_iters) / max_iters) ** power
    if iteration < warmup_iters:
        lr *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return lr


class PolyWarmupLR(LRScheduler):
    """poly_warmup_lr as a Paddle scheduler stepped once per iteration; ``last_epoch`` counts iterations. With
    layer decay each parameter's LR is this times its group's scale, which is mmcv's per-group LR as long as
    min_lr is 0 (mmcv applies min_lr to every group, unscaled)."""

    def __init__(self, base_lr: float, *, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float,
                 last_step: int = -1):
        if max_iters <= 0 or warmup_iters < 0 or not 0.0 < warmup_ratio <= 1.0:
            raise ValueError(f'max_iters must be positive, warmup_iters not negative and warmup_ratio in (0, 1]; '
                             f'got {max_iters}, {warmup_iters}, {warmup_ratio}')
        self.max_iters = max_iters
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.power = power
        super().__init__(learning_rate=base_lr, last_epoch=last_step)

    def get_lr(self) -> float:
        return poly_warmup_lr(self.last_epoch, base_lr=self.base_lr, max_iters=self.max_iters,
                              warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio, power=self.power)


def build_seg_lr_scheduler(config, base_lr: float, *, max_iters: int, last_step: int = -1) -> PolyWarmupLR:
    """The schedule of ``base_lr`` over the run's ``max_iters`` iterations (TRAIN.NUM_EPOCHS x the steps of an
    epoch), positioned after ``last_step`` + 1 of them."""
    seg = config.SEG
    for keys, valid, rule in ((('SEG.WARMUP_ITERS', 'TRAIN.NUM_EPOCHS'), 0 <= seg.WARMUP_ITERS <= max_iters,
                               f'SEG.WARMUP_ITERS must lie in [0, {max_iters}], the run\'s iterations '
                               f'(TRAIN.NUM_EPOCHS x the optimizer steps of an epoch), got {seg.WARMUP_ITERS}'),
                              (('SEG.WARMUP_RATIO',), 0.0 < seg.WARMUP_RATIO <= 1.0,
                               f'SEG.WARMUP_RATIO must be in (0, 1], got {seg.WARMUP_RATIO}'),
                              (('SEG.POWER',), seg.POWER > 0, f'SEG.POWER must be positive, got {seg.POWER}')):
        if not valid:
            raise ConfigError(named_origin(config, *keys) + rule)
    return PolyWarmupLR(base_lr, max_iters=max_iters, warmup_iters=seg.WARMUP_ITERS,
                        warmup_ratio=seg.WARMUP_RATIO, power=seg.POWER, last_step=last_step)
