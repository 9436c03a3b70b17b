"""BEiT v2 VQ-KD tokenizer training (unilm's beit2 run_vqkd_training.py): the task of main_tokenizer.py, run by
the same job and engine as every task (checks before output, checkpoints, exact resume, processes, AMP, logs).

- Model: vqkd_model.VQKD (encoder, EMA codebook, decoder); checkpoints hold its whole state, the codebook's EMA
  buffers included, under unilm's names: a checkpoint is PRETRAIN.TOKENIZER_WEIGHTS for pre-training as it is
  (vqkd_tokenizer.build_vqkd_tokenizer keeps the tokenizer's tensors of a training checkpoint).
- Teacher: vqkd_teacher.TEACHERS[VQKD.TEACHER], frozen, held by the objective (not trained, not saved).
- Loss (unilm's): the quantiser's BETA x commitment loss + the mean over patches of 1 - cos(decoder output,
  teacher feature).
- Data: the classification list/folder images (labels unused) as unilm's tokenizer training reads them: random
  resized crop (TRAIN.RRC_SCALE, RRC_RATIO, DATA.INTERPOLATION) and flip for training, resize + centre crop
  (DATA.CROP_PCT) for val, pixels in [0, 1], not normalised.
- Optimizer: AdamW with unilm's decay rule (none for 1-D tensors, biases, cls tokens and position embeddings; the
  codebook is no parameter), TRAIN.BASE_LR x total batch / TRAIN.LINEAR_SCALED_LR (unilm: 5e-5 per 128 images),
  linear warm-up from TRAIN.WARMUP_START_LR and cosine to TRAIN.END_LR, both unscaled as unilm's, stepped per
  optimizer step.
- Codebook usage: every batch adds its per-code counts to the step's counts vector, so the engine's all-reduce
  sums them over processes and the epoch exactly; ``codes_used`` is how many codes the epoch's (or the val
  split's) batches picked, ``codebook_usage`` that over the codebook size: in metrics.jsonl for train and val,
  in every val line of the log, and drawn. The metric (train log lines, best checkpoint) is ``rec_cosine``, the
  mean cosine between reconstruction and teacher feature (1 - rec_loss): the best checkpoint is the best
  reconstruction, not the widest usage (a usage peak came early in the demo, with a far worse reconstruction).
"""
import logging

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from config import validate_tokenizer_training_config
from datasets import get_dataset
from device_batch import ClassificationBatch, NormaliseAndErase
from engine import Amp, World
from optim import WarmupCosineLR, decays_weight, linear_scaling
from tasks import Curve, Task
from transforms import get_linear_probe_transforms, get_val_transforms
from utils import LOGGER_NAME
from vqkd_model import VQKD, build_vqkd
from vqkd_teacher import TEACHERS

NUM_LOSS_COUNTS = 4  # loss sum, reconstruction loss sum, quantiser loss sum, images; then the per-code counts


def cosine_reconstruction_loss(reconstructed: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """unilm's 'cosine' loss: 1 - cos between each patch's reconstruction and its teacher feature, averaged over
    all patches of the batch."""
    return (1.0 - (F.normalize(reconstructed, axis=-1) * F.normalize(target, axis=-1)).sum(-1)).mean()


class TokenizerObjective:
    """A batch (images in [0, 1], unused labels) -> (quantiser loss + reconstruction loss, counts [loss sum,
    reconstruction sum, quantiser sum, images, K per-code counts])."""

    metric = 'rec_cosine'
    logged = ('loss', 'rec_loss', 'quant_loss', 'codes_used', 'codebook_usage')
    batch_draws = None

    def __init__(self, teacher: nn.Layer, codebook_size: int):
        self.teacher = teacher
        self.codebook_size = codebook_size
        self.num_counts = NUM_LOSS_COUNTS + codebook_size

    def _losses(self, model: nn.Layer, images: paddle.Tensor, amp: Amp) -> tuple:
        target = self.teacher.patch_features(images)
        with amp.autocast():
            reconstructed, quantizer_loss, ids = model(images)
        rec_loss = cosine_reconstruction_loss(reconstructed.astype('float32'), target)
        return quantizer_loss + rec_loss, rec_loss, quantizer_loss, ids

    def _counts(self, losses: tuple, num_images: int) -> paddle.Tensor:
        loss, rec_loss, quantizer_loss, ids = losses
        sums = paddle.stack([value.detach().astype('float64') * num_images for value in (loss, rec_loss,
                                                                                          quantizer_loss)])
        codes = paddle.bincount(ids.reshape([-1]), minlength=self.codebook_size).astype('float64')
        return paddle.concat([sums, paddle.full([1], num_images, dtype='float64'), codes])

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images = batch[0]
        losses = self._losses(model, images, amp)
        with paddle.no_grad():
            counts = self._counts(losses, images.shape[0])
        return losses[0], counts

    @paddle.no_grad()
    def evaluate_batch(self, model: nn.Layer, batch, amp: Amp) -> paddle.Tensor:
        images = batch[0]
        return self._counts(self._losses(model, images, amp), images.shape[0])

    def summarise(self, totals) -> dict:
        totals = np.asarray(totals, dtype=np.float64)
        images = max(float(totals[3]), 1.0)
        used = int((totals[NUM_LOSS_COUNTS:] > 0).sum())
        rec_loss = float(totals[1]) / images
        return {'loss': float(totals[0]) / images, 'rec_loss': rec_loss, 'rec_cosine': 1.0 - rec_loss,
                'quant_loss': float(totals[2]) / images, 'codes_used': used,
                'codebook_usage': used / self.codebook_size, 'num_samples': int(totals[3])}

    def reseed(self, seed: int) -> None:
        """Nothing of the objective is random (k-means draws from the global generator the epoch seeds)."""


def build_tokenizer_objective(config, world: World) -> TokenizerObjective:
    teacher = TEACHERS[config.VQKD.TEACHER].build(config, logging.getLogger(LOGGER_NAME))
    return TokenizerObjective(teacher, config.VQKD.CODEBOOK_SIZE)


def build_tokenizer_model(config) -> VQKD:
    return build_vqkd(config, TEACHERS[config.VQKD.TEACHER].feature_dim(config))


UNIT_PIXELS = NormaliseAndErase(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x / 255: unilm's ToTensor


def _unnormalised(data_set):
    """``data_set`` with its batches as float32 pixels in [0, 1] on the device, not normalised."""
    data_set.on_device = ClassificationBatch(UNIT_PIXELS)
    return data_set


def get_tokenizer_train_set(config):
    return _unnormalised(get_dataset(config, 'train', build_transform=get_linear_probe_transforms))


def get_tokenizer_val_set(config):
    return _unnormalised(get_dataset(config, 'val', build_transform=get_val_transforms))


def tokenizer_param_settings(model: VQKD, weight_decay: float) -> dict:
    """{name: {lr_scale, weight_decay}} of every trained parameter: unilm's decay rule, no layer decay."""
    skip = model.no_weight_decay()
    return {name: {'lr_scale': 1.0, 'weight_decay': weight_decay if decays_weight(name, param, skip) else 0.0}
            for name, param in model.named_parameters() if not param.stop_gradient}


def build_tokenizer_optimizer(config, model: VQKD, steps_per_epoch: int, world_size: int) -> tuple:
    """(AdamW, unilm's warm-up + cosine schedule, the settings table)."""
    train = config.TRAIN
    peak = train.BASE_LR * linear_scaling(config, world_size, train.LINEAR_SCALED_LR)
    scheduler = WarmupCosineLR(peak, train.WARMUP_START_LR, train.END_LR,
                               warmup_steps=train.WARMUP_EPOCHS * steps_per_epoch,
                               total_steps=train.NUM_EPOCHS * steps_per_epoch,
                               last_step=train.LAST_EPOCH * steps_per_epoch - 1)
    settings = tokenizer_param_settings(model, train.WEIGHT_DECAY)
    params = dict(model.named_parameters())
    decayed = {params[name].name for name, setting in settings.items() if setting['weight_decay'] > 0}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=[params[name] for name in settings], beta1=train.OPTIMIZER.BETAS[0],
        beta2=train.OPTIMIZER.BETAS[1], epsilon=train.OPTIMIZER.EPS, weight_decay=train.WEIGHT_DECAY,
        apply_decay_param_fun=decayed.__contains__,
        grad_clip=nn.ClipGradByGlobalNorm(train.GRAD_CLIP) if train.GRAD_CLIP > 0 else None)
    return optimizer, scheduler, settings


def check_tokenizer_training_config(config) -> None:
    """config.validate_tokenizer_training_config, then the teacher's own checks (its config, its grid)."""
    validate_tokenizer_training_config(config)
    TEACHERS[config.VQKD.TEACHER].check(config)


TOKENIZER_TRAINING = Task('VQ-KD tokenizer training', build_tokenizer_model, get_tokenizer_train_set,
                          get_tokenizer_val_set, build_tokenizer_objective, check_tokenizer_training_config,
                          build_optimizer=build_tokenizer_optimizer,
                          curves=(Curve('train', 'codebook_usage', 'train codebook usage', percent=True),
                                  Curve('val', 'codebook_usage', 'val codebook usage', percent=True)))
