"""Fine-tuning and evaluation of a classifier: the task of main_single_gpu.py and main_multi_gpu.py.

Counts of a batch: [loss sum, correct@1, correct@5, images]; accuracies are measured against the un-mixed labels.
"""
from functools import partial

import numpy as np
import paddle
import paddle.nn as nn

from beit import build_beit
from datasets import get_dataset
from engine import Amp, World
from losses import build_criterion, cross_entropy
from mixup import BatchDraws, Mixup, build_mixup
from tasks import Curve, Task

TOP_K = (1, 5)


def topk_correct(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """float64 [len(TOP_K)]: how many rows have their label among the k largest logits, for each k of TOP_K."""
    k_max = min(max(TOP_K), logits.shape[1])
    top = paddle.topk(logits, k_max, axis=1)[1]
    hits = (top == labels.reshape([-1, 1]).astype(top.dtype)).astype('float64')
    return paddle.stack([hits[:, :min(k, k_max)].sum() for k in TOP_K])


def batch_counts(loss_sum: paddle.Tensor, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """float64 [loss sum, correct@1, correct@5, samples] of one batch: what is summed over batches and ranks."""
    count = paddle.full([1], labels.shape[0], dtype='float64')
    return paddle.concat([loss_sum.astype('float64').reshape([1]), topk_correct(logits, labels), count])


class ClassificationObjective:
    """(images, labels) -> ``criterion`` of the logits, against Mixup/CutMix targets when ``mixup``.

    With ``mixup`` a training batch is (images, labels, *draws): the loader draws with ``batch_draws``
    (mixup.BatchDraws of the same Mixup, so ``reseed`` reseeds them) and the step only applies the draws.
    """

    metric = 'acc1'
    logged = ('loss', 'acc1', 'acc5')
    num_counts = 4

    def __init__(self, criterion: nn.Layer, mixup: Mixup | None = None, image_size: int | None = None):
        if mixup is not None and image_size is None:
            raise ValueError('Mixup needs the image_size of the training batches: its boxes are drawn in the loader')
        self.criterion = criterion
        self.mixup = mixup
        self.batch_draws = BatchDraws(mixup, image_size, image_size) if mixup is not None else None

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, labels, *draws = batch
        targets = labels
        if self.mixup is not None:
            if not draws:
                raise ValueError('a Mixup/CutMix training batch must carry its draws: load it with '
                                 'datasets.get_dataloader(..., batch_draws=objective.batch_draws)')
            drawn_for = [self.batch_draws.height, self.batch_draws.width]
            if list(images.shape[2:]) != drawn_for:
                raise ValueError(f'Mixup draws are for {drawn_for[0]}x{drawn_for[1]} images (DATA.IMAGE_SIZE), the '
                                 f'batch has {images.shape[2]}x{images.shape[3]}')
            images, targets = self.mixup.mix(images, labels, draws)
        logits = amp.forward(model, images)
        loss = self.criterion(logits, targets)
        with paddle.no_grad():
            return loss, batch_counts(loss.detach() * labels.shape[0], logits.detach(), labels)

    @staticmethod
    @paddle.no_grad()
    def evaluate_batch(model: nn.Layer, batch, amp: Amp) -> paddle.Tensor:
        """The counts of a val batch: plain cross entropy (no smoothing, no mixing)."""
        images, labels = batch
        logits = amp.forward(model, images)
        return batch_counts(cross_entropy(logits, labels, reduction='sum'), logits, labels)

    @staticmethod
    def summarise(totals: np.ndarray) -> dict:
        loss_sum, correct1, correct5, count = totals
        count = max(count, 1.0)
        return {'loss': loss_sum / count, 'acc1': correct1 / count, 'acc5': correct5 / count,
                'num_samples': int(totals[3])}

    def reseed(self, seed: int) -> None:
        if self.mixup is not None:
            self.mixup.rng = np.random.default_rng(seed)


def build_classification_objective(config, world: World) -> ClassificationObjective:
    """Cross entropy with Mixup/CutMix and label smoothing as configured; Mixup draws from (SEED, rank), for
    DATA.IMAGE_SIZE square images (the train transforms' output)."""
    mixup = build_mixup(config, rng=np.random.default_rng(config.SEED + world.rank))
    return ClassificationObjective(build_criterion(config, mixup is not None), mixup, config.DATA.IMAGE_SIZE)


def _no_extra_checks(config) -> None:
    """Fine-tuning configs need nothing beyond config.validate_config."""


FINE_TUNING = Task('fine-tuning', build_beit, partial(get_dataset, mode='train'), partial(get_dataset, mode='val'),
                   build_classification_objective, _no_extra_checks,
                   curves=(Curve('train', 'acc1', 'train (mixed targets)', percent=True),
                           Curve('val', 'acc1', 'val', percent=True)))
