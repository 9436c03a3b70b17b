"""Semantic segmentation (BEiT + UperNet, unilm's beit/semantic_segmentation on mmseg 0.11): the task of
main_segment.py, trained and evaluated by the same job and engine as the other tasks.

- Model: beit_seg.build_beit_upernet; -pretrained fits a segmentor's file whole and a classification or
  pre-training file into the backbone (BeitUperNet.fit_pretrained, which checkpoint.load_pretrained calls).
- Loss: main and auxiliary logits each resized bilinearly (align_corners False) to the labels, cross entropy with
  SEG.IGNORE_INDEX, main + SEG.AUX_LOSS_WEIGHT x auxiliary. Averaged as mmseg 0.11 averages it: its
  CrossEntropyLoss takes the per-pixel losses (0 at ignored pixels) and weight_reduce_loss's 'mean' divides their
  sum by the number of ALL pixels, the ignored ones included (not by the labelled ones as torch's 'mean' would).
- Schedule: AdamW over seg_optim's layer-decay groups, poly with linear warm-up stepped per iteration over the
  whole run, TRAIN.NUM_EPOCHS x the optimizer steps of an epoch (the job counts epochs: one source of truth; a
  zoo config names the epochs that make unilm's 160k iterations).
- Evaluation: each val image (batches of one: their sizes differ) comes as decoded; every test scale resizes it
  from the original (SegEvalTransform's resize and normalisation, as mmseg's MultiScaleFlipAug does), and
  seg_inference segments it at its original size (one scale, or SEG.MS_RATIOS with SEG.FLIP), counted by
  seg_metrics. The counts vector [loss sum, 4 x SEG.NUM_CLASSES pixel counts, images] is float64 and summed by the
  engine's one all-reduce, so the mIoU over several processes is the whole set's, exactly. Training steps fill
  the same vector from the main head's prediction on the crops.
"""
import os
from functools import partial

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

from beit_seg import BeitUperNet, build_beit_upernet, convert_sync_batchnorm
from config import ConfigError, named_origin
from engine import Amp, World
from optim import linear_scaling
from seg_datasets import LabelRule, SegmentationDataset, checked_pairs, get_seg_dataset, validate_seg_data_config
from seg_inference import segment_probs, settings_from_config
from seg_metrics import class_table, num_counts, pixel_counts, read_class_names, summarise
from seg_optim import build_seg_lr_scheduler, seg_param_groups, seg_param_settings
from seg_transforms import normalise, resize_bilinear
from tasks import Curve, Task

ADE20K_NUM_CLASSES = 150
CLASSES_FILE = 'classes.txt'  # in DATA_PATH: the data's own class names, if it has them
_TINY = float(np.finfo(np.float32).tiny)  # the val loss's floor for a probability that underflowed to 0


def resized_to(logits: paddle.Tensor, size) -> paddle.Tensor:
    """float32 logits resized bilinearly (align_corners False, mmseg's resize) to ``size``."""
    logits = logits.astype('float32')
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=list(size), mode='bilinear', align_corners=False)


def pixel_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, ignore_index: int) -> paddle.Tensor:
    """mmseg 0.11's CrossEntropyLoss of logits at the labels' size: the per-pixel losses (0 where the label is
    ``ignore_index``) averaged over every pixel, the ignored ones counted in the denominator."""
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction='none', axis=1).mean()


class OriginalImage:
    """The task's val pipeline: the decoded image as it is (uint8 HWC) with its int64 labels; the objective makes
    each test scale from it (SegmentationObjective.views)."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(image), label.astype(np.int64)


def get_seg_val_set(config) -> SegmentationDataset:
    pairs, source = checked_pairs(config, 'val')
    return SegmentationDataset(pairs, OriginalImage(), LabelRule.from_config(config), source)


class SegmentationObjective:
    """(images, label maps) -> main + weight x auxiliary cross entropy; counts [loss sum, 4 x C pixel counts,
    images]. Metrics: ``miou`` (the metric), ``aacc``, ``macc``, ``loss`` and per class ``iou`` and ``acc``
    (lists, None for a class without pixels); ``describe`` gives the per-class table job.py logs after an
    evaluation. The val ``loss`` is the cross entropy of the prediction (-log of the averaged softmax at the label,
    floored at float32's tiny), averaged over all pixels as training averages."""

    metric = 'miou'
    logged = ('loss', 'miou', 'aacc', 'macc')
    batch_draws = None

    def __init__(self, *, num_classes: int, ignore_index: int, aux_weight: float, settings, mean=(0.5,) * 3,
                 std=(0.5,) * 3, class_names=None):
        self.num_classes, self.ignore_index, self.aux_weight = num_classes, ignore_index, aux_weight
        self.settings, self.mean, self.std, self.class_names = settings, mean, std, class_names
        self.num_counts = 1 + num_counts(num_classes) + 1

    def loss(self, main: paddle.Tensor, aux: paddle.Tensor, labels: paddle.Tensor) -> tuple:
        """(loss, main logits at the labels' size)."""
        size = labels.shape[-2:]
        main = resized_to(main, size)
        loss = (pixel_cross_entropy(main, labels, self.ignore_index)
                + self.aux_weight * pixel_cross_entropy(resized_to(aux, size), labels, self.ignore_index))
        return loss, main

    def _counts(self, loss_sum: paddle.Tensor, pixel: paddle.Tensor, images: int) -> paddle.Tensor:
        return paddle.concat([loss_sum.astype('float64').reshape([1]), pixel.astype('float64'),
                              paddle.full([1], images, dtype='float64')])

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, labels = batch
        with amp.autocast():
            main, aux = model(images)
        loss, main = self.loss(main, aux, labels)
        with paddle.no_grad():
            pred = paddle.argmax(main.detach(), axis=1)
            counts = self._counts(loss.detach() * labels.shape[0],
                                  pixel_counts(pred, labels, self.num_classes, self.ignore_index), labels.shape[0])
        return loss, counts

    @paddle.no_grad()
    def evaluate_batch(self, model: nn.Layer, batch, amp: Amp) -> paddle.Tensor:
        images, labels = batch
        if images.shape[0] != 1:
            raise ValueError(f'segmentation evaluates one image per batch (their sizes differ), got {images.shape[0]}')
        probs = segment_probs(lambda x: amp.forward(model, x), self.views(images.numpy()[0]), labels.shape[-2:],
                              self.settings)
        valid = labels != self.ignore_index
        picked = paddle.take_along_axis(probs, paddle.where(valid, labels, paddle.zeros_like(labels)).unsqueeze(1),
                                        axis=1).squeeze(1)
        nll = -paddle.log(paddle.clip(picked, min=_TINY)) * valid.astype('float32')
        pixel = pixel_counts(paddle.argmax(probs, axis=1), labels, self.num_classes, self.ignore_index)
        return self._counts(nll.mean(), pixel, 1)

    def views(self, image: np.ndarray):
        """(height, width) -> the normalised [1, 3, height, width] of the uint8 HWC ``image`` resized to it."""
        def view(shape) -> np.ndarray:
            return normalise(resize_bilinear(image, shape[1], shape[0]), self.mean, self.std)[None]
        return view

    def summarise(self, totals: np.ndarray) -> dict:
        totals = np.asarray(totals, np.float64)
        images = float(totals[-1])
        metrics = summarise(totals[1:-1])
        return {'loss': float(totals[0]) / max(images, 1.0), 'miou': metrics['miou'], 'aacc': metrics['aacc'],
                'macc': metrics['macc'], 'iou': metrics['iou'], 'acc': metrics['acc'], 'num_samples': int(images)}

    @property
    def names(self) -> list[str]:
        """The class names, or the class indices as names when the data has none."""
        return self.class_names or [str(index) for index in range(self.num_classes)]

    def describe(self, result: dict) -> str:
        """The per-class IoU and accuracy table of a summarised result, for the log."""
        as_array = [np.array([np.nan if value is None else value for value in result[key]]) for key in ('iou', 'acc')]
        return 'per class (%):\n' + class_table(self.names, *as_array)

    def reseed(self, seed: int) -> None:
        """Nothing of the objective is random."""


def _class_names(config):
    """The names in DATA_PATH/classes.txt (line k names class k) when the data has one; else ADE20K's for an ade20k
    run of its 150 classes; else the class indices name them."""
    path = os.path.join(config.DATA.DATA_PATH, CLASSES_FILE)
    if os.path.isfile(path):
        names = read_class_names(path)
        if len(names) != config.SEG.NUM_CLASSES:
            raise ConfigError(f'{path} names {len(names)} classes and SEG.NUM_CLASSES is {config.SEG.NUM_CLASSES}')
        return names
    if config.SEG.DATASET == 'ade20k' and config.SEG.NUM_CLASSES == ADE20K_NUM_CLASSES:
        return read_class_names()
    return None


def build_segmentation_objective(config, world: World) -> SegmentationObjective:
    seg = config.SEG
    return SegmentationObjective(num_classes=seg.NUM_CLASSES, ignore_index=seg.IGNORE_INDEX,
                                 aux_weight=seg.AUX_LOSS_WEIGHT, settings=settings_from_config(config),
                                 mean=config.DATA.IMAGENET_MEAN, std=config.DATA.IMAGENET_STD,
                                 class_names=_class_names(config))


def build_segmentor(config) -> BeitUperNet:
    """build_beit_upernet, its BatchNorms made SyncBatchNorm in a run of several GPU processes as unilm's are
    (Paddle has no CPU kernel for it: CPU processes keep per-process statistics)."""
    model = build_beit_upernet(config)
    if dist.get_world_size() > 1 and not paddle.get_device().startswith('cpu'):
        model = convert_sync_batchnorm(model)
    return model


def build_seg_optimizer(config, model: BeitUperNet, steps_per_epoch: int, world_size: int) -> tuple:
    """(AdamW over unilm's layer-decay groups, the poly warm-up schedule over the run's iterations, the settings
    table). The LR is TRAIN.BASE_LR (scaled only when SEG.LINEAR_SCALED_LR names a reference batch)."""
    train = config.TRAIN
    base_lr = train.BASE_LR * linear_scaling(config, world_size, train.LINEAR_SCALED_LR)
    scheduler = build_seg_lr_scheduler(config, base_lr, max_iters=train.NUM_EPOCHS * steps_per_epoch,
                                       last_step=train.LAST_EPOCH * steps_per_epoch - 1)
    decay = dict(weight_decay=train.WEIGHT_DECAY, layer_decay=train.LAYER_DECAY)
    optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=seg_param_groups(model, **decay),
                                       weight_decay=train.WEIGHT_DECAY, beta1=train.OPTIMIZER.BETAS[0],
                                       beta2=train.OPTIMIZER.BETAS[1], epsilon=train.OPTIMIZER.EPS)
    return optimizer, scheduler, seg_param_settings(model, **decay)


def check_segmentation_config(config) -> None:
    """What segmentation needs beyond validate_config, each refusal naming where the value came from."""
    validate_seg_data_config(config)
    settings_from_config(config)
    if config.DATA.BATCH_SIZE_EVAL != 1:
        raise ConfigError(named_origin(config, 'DATA.BATCH_SIZE_EVAL') + 'DATA.BATCH_SIZE_EVAL must be 1 for '
                          f'segmentation (val images keep their own sizes), got {config.DATA.BATCH_SIZE_EVAL}')
    if config.TRAIN.GRAD_CLIP > 0:
        raise ConfigError(named_origin(config, 'TRAIN.GRAD_CLIP') + 'TRAIN.GRAD_CLIP: Paddle clips each layer-decay '
                          'group on its own, not the global norm (unilm\'s segmentation clips nothing): set 0')


SEGMENTATION = Task('semantic segmentation', build_segmentor, partial(get_seg_dataset, mode='train'),
                    get_seg_val_set, build_segmentation_objective, check_segmentation_config,
                    build_optimizer=build_seg_optimizer,
                    own_keys=(('TRAIN.LINEAR_SCALED_LR', 'SEG.LINEAR_SCALED_LR'),),
                    curves=(Curve('val', 'miou', 'val mIoU', percent=True),
                            Curve('val', 'aacc', 'val pixel accuracy', percent=True),
                            Curve('train', 'miou', 'train mIoU (crops)', percent=True)))
