"""Linear probing of a frozen BEiT, unilm's measure of what pre-training learned (beit/run_linear_eval.py): the task
of main_linprobe.py.

The encoder (any weights fine-tuning loads, pre-training checkpoints included) stays frozen in eval mode. Each
probed block's output becomes concat(cls token, mean of the patch tokens), [B, 2D], and one linear classifier per
block (weights N(0, 0.01), bias 0) learns the classes from it; all are trained at once on the sum of their cross
entropies. Only the classifiers reach the optimizer and the checkpoints. Counts of a batch: [loss sum, correct@1,
correct@5] of each probed block in block order, then the images.
"""
from collections.abc import Sequence
from functools import partial

import numpy as np
import paddle
import paddle.nn as nn

from beit import Beit, build_beit, resolve_block_indices
from config import ConfigError, named_origin
from datasets import get_dataset
from engine import Amp, World
from losses import cross_entropy
from optim import WarmupCosineLR, linear_scaling
from task_finetune import topk_correct
from tasks import Curve, Task
from transforms import get_linear_probe_transforms

FEATURE_INIT_STD = 0.01  # unilm's classifier weights: N(0, 0.01), bias 0


class LinearProbe(nn.Layer):
    """A frozen encoder and one linear classifier per probed block: images -> the logits of each, in block order."""

    def __init__(self, encoder: Beit, blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.encoder = encoder
        for param in encoder.parameters():
            param.stop_gradient = True
        self.blocks = list(blocks)
        weight = paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, FEATURE_INIT_STD))
        bias = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
        self.classifiers = nn.LayerList([nn.Linear(2 * encoder.embed_dim, num_classes, weight, bias)
                                         for _ in self.blocks])

    @paddle.no_grad()
    def block_features(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        """float32 [B, 2D] per probed block: its cls token next to the mean of its patch tokens (before the final
        norm). The encoder runs in eval mode whatever the probe's mode: Layer.train (DataParallel's too) sets every
        sublayer's flag, so it is cleared here, and dropout and drop path never act on the features."""
        for layer in self.encoder.sublayers(include_self=True):
            layer.training = False
        outputs = self.encoder.forward_intermediates(images, indices=self.blocks, return_prefix_tokens=True,
                                                     norm=False, stop_early=True, output_fmt='NLC',
                                                     intermediates_only=True)
        return [paddle.concat([cls[:, 0], patches.mean(axis=1)], axis=-1).astype('float32')
                for patches, cls in outputs]

    def forward(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        return [classifier(features) for classifier, features in zip(self.classifiers, self.block_features(images))]


def probed_blocks(config) -> list[int]:
    """The sorted block indices of LINPROBE.BLOCKS ([]: every block of MODEL.DEPTH)."""
    try:
        return resolve_block_indices(config.MODEL.DEPTH, list(config.LINPROBE.BLOCKS) or None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'{named_origin(config, "LINPROBE.BLOCKS", "MODEL.DEPTH")}LINPROBE.BLOCKS '
                          f'{list(config.LINPROBE.BLOCKS)} for a model of MODEL.DEPTH {config.MODEL.DEPTH} blocks: '
                          f'{err}') from err


def build_linear_probe(config) -> LinearProbe:
    """The fine-tuning model of ``config`` as the frozen encoder, with a classifier per probed block."""
    return LinearProbe(build_beit(config), probed_blocks(config), config.MODEL.NUM_CLASSES)


def encoder_and_classifiers(probe: LinearProbe) -> tuple[nn.Layer, nn.Layer]:
    """(frozen part, trained part): -pretrained loads into the encoder, checkpoints hold the classifiers."""
    return probe.encoder, probe.classifiers


def block_counts(loss_sums: list[paddle.Tensor], outputs: list[paddle.Tensor], labels: paddle.Tensor) -> paddle.Tensor:
    """float64 [loss sum, correct@1, correct@5] of each block, then the sample count: what is summed."""
    per_block = [paddle.concat([loss_sum.astype('float64').reshape([1]), topk_correct(logits, labels)])
                 for loss_sum, logits in zip(loss_sums, outputs)]
    return paddle.concat([*per_block, paddle.full([1], labels.shape[0], dtype='float64')])


class LinearProbeObjective:
    """(images, labels) -> the sum over probed blocks of each classifier's cross entropy (unilm's loss).

    Metrics: per block ``acc1_block<i>``, ``acc5_block<i>``, ``loss_block<i>``; ``loss`` their summed loss,
    ``best_block`` the block of the highest top-1 and ``best_acc1`` that top-1 (the metric the best checkpoint
    follows)."""

    metric = 'best_acc1'
    batch_draws = None  # no Mixup

    def __init__(self, blocks: Sequence[int]):
        self.blocks = list(blocks)
        self.num_counts = 3 * len(self.blocks) + 1
        self.logged = ('loss', 'best_acc1', 'best_block', *(f'acc1_block{block}' for block in self.blocks))

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, labels = batch
        outputs = amp.forward(model, images)
        losses = [cross_entropy(logits, labels) for logits in outputs]
        with paddle.no_grad():
            counts = block_counts([loss.detach() * labels.shape[0] for loss in losses],
                                  [logits.detach() for logits in outputs], labels)
        return paddle.add_n(losses), counts

    @paddle.no_grad()
    def evaluate_batch(self, model: nn.Layer, batch, amp: Amp) -> paddle.Tensor:
        images, labels = batch
        outputs = amp.forward(model, images)
        return block_counts([cross_entropy(logits, labels, reduction='sum') for logits in outputs], outputs, labels)

    def summarise(self, totals: np.ndarray) -> dict:
        count = max(float(totals[-1]), 1.0)
        per_block = np.asarray(totals[:-1], dtype=np.float64).reshape(len(self.blocks), 3) / count
        best = int(np.argmax(per_block[:, 1]))
        result = {'loss': float(per_block[:, 0].sum()), 'best_acc1': float(per_block[best, 1]),
                  'best_block': self.blocks[best], 'num_samples': int(totals[-1])}
        for block, (loss, acc1, acc5) in zip(self.blocks, per_block):
            result.update({f'acc1_block{block}': float(acc1), f'acc5_block{block}': float(acc5),
                           f'loss_block{block}': float(loss)})
        return result

    def reseed(self, seed: int) -> None:
        """Nothing of the objective is random."""


def _linear_probe_objective(config, world: World) -> LinearProbeObjective:
    return LinearProbeObjective(probed_blocks(config))


def build_probe_optimizer(config, model: LinearProbe, steps_per_epoch: int, world_size: int) -> tuple:
    """(optimizer, scheduler, settings table) of unilm's protocol over the classifiers alone: AdamW (decay
    LINPROBE.WEIGHT_DECAY on every classifier tensor) or SGD with LINPROBE.MOMENTUM; LR BASE_LR x total batch /
    LINEAR_SCALED_LR, cosine to 0 over the run (stepped per optimizer step), no warm-up, no clipping."""
    probe, steps = config.LINPROBE, steps_per_epoch
    peak = probe.BASE_LR * linear_scaling(config, world_size, probe.LINEAR_SCALED_LR)
    scheduler = WarmupCosineLR(peak, peak, 0.0, warmup_steps=0, total_steps=config.TRAIN.NUM_EPOCHS * steps,
                               last_step=config.TRAIN.LAST_EPOCH * steps - 1)
    params = dict(model.classifiers.named_parameters(prefix='classifiers'))
    if probe.OPTIMIZER == 'sgd':
        optimizer = paddle.optimizer.Momentum(learning_rate=scheduler, momentum=probe.MOMENTUM,
                                              parameters=list(params.values()), weight_decay=probe.WEIGHT_DECAY)
    else:
        optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=list(params.values()),
                                           weight_decay=probe.WEIGHT_DECAY)
    return optimizer, scheduler, {name: {'lr_scale': 1.0, 'weight_decay': probe.WEIGHT_DECAY} for name in params}


def check_linear_probe_config(config) -> None:
    """What linear probing needs beyond validate_config: classes to learn, blocks the model has, training in
    dygraph without -eval or an EMA (both act on the whole model, the frozen encoder included). Each error names
    where the value came from (config.named_origin)."""
    if config.EVAL:
        raise ConfigError(named_origin(config, 'EVAL') + 'linear probing evaluates its classifiers every '
                          'VALIDATE_FREQ epochs: -eval (EVAL) is for fine-tuned models (main_single_gpu.py)')
    if config.TRAIN.MODEL_EMA:
        raise ConfigError(named_origin(config, 'TRAIN.MODEL_EMA') + 'TRAIN.MODEL_EMA: linear probing keeps no EMA '
                          '(unilm\'s protocol; it would copy the frozen encoder): add -opts TRAIN.MODEL_EMA False')
    if config.MODEL.TO_STATIC:
        raise ConfigError(named_origin(config, 'MODEL.TO_STATIC') + 'MODEL.TO_STATIC compiles forward, and linear '
                          'probing reads the blocks\' outputs: run it in dygraph (MODEL.TO_STATIC False)')
    if config.MODEL.NUM_CLASSES < 1:
        raise ConfigError(named_origin(config, 'MODEL.NUM_CLASSES') + 'MODEL.NUM_CLASSES must be positive for '
                          'linear probing: the classes of the dataset')
    probed_blocks(config)


LINEAR_PROBING = Task('linear probing', build_linear_probe,
                      partial(get_dataset, mode='train', build_transform=get_linear_probe_transforms),
                      partial(get_dataset, mode='val'), _linear_probe_objective, check_linear_probe_config,
                      build_optimizer=build_probe_optimizer, split=encoder_and_classifiers,
                      own_keys=(('TRAIN.NUM_EPOCHS', 'LINPROBE.NUM_EPOCHS'),
                                ('DATA.BATCH_SIZE', 'LINPROBE.BATCH_SIZE')),
                      curves=(Curve('val', 'best_acc1', 'val, best probed block', percent=True),))
