"""Masked image modeling pre-training: the task of main_pretrain.py (no evaluation split).

The frozen tokenizer (PRETRAIN.TOKENIZER: BEiT v1's DALL-E encoder or BEiT v2's VQ-KD) labels every patch with its
visual token; the model predicts the tokens of the masked patches (BEiT v2's model, PRETRAIN.CLS_PT, twice: from
its main branch and from its CLS branch).
"""
import paddle
import paddle.nn as nn

from beit_pretrain import build_beit_pretrain
from config import validate_pretraining_config
from dalle_tokenizer import TokenizerWeightsError, build_tokenizer
from datasets import get_pretraining_dataset
from engine import Amp, World
from losses import cross_entropy_rows
from tasks import Curve, Task
from vqkd_tokenizer import VQKDWeightsError, build_vqkd_tokenizer


def build_tokenizer_for(config) -> nn.Layer:
    """The frozen tokenizer PRETRAIN.TOKENIZER names: converted weights, or random ones (seeded by SEED, so every
    process and every resumed run has the same) when PRETRAIN.RANDOM_TOKENIZER allows it."""
    if config.PRETRAIN.TOKENIZER_WEIGHTS == '':
        paddle.seed(config.SEED)
    if config.PRETRAIN.TOKENIZER == 'vqkd':
        return _vqkd_tokenizer_for(config)
    return _dalle_tokenizer_for(config)


def _dalle_tokenizer_for(config) -> nn.Layer:
    pretrain = config.PRETRAIN
    path = pretrain.TOKENIZER_WEIGHTS or None
    try:
        tokenizer = build_tokenizer(path, trust_pickle=config.TRUST_PICKLE, n_hid=pretrain.TOKENIZER_HIDDEN,
                                    n_blk_per_group=pretrain.TOKENIZER_BLOCKS_PER_GROUP,
                                    vocab_size=pretrain.VOCAB_SIZE)
    except TokenizerWeightsError as err:  # missing, unreadable or another size: named by the config keys
        raise TokenizerWeightsError(f'PRETRAIN.TOKENIZER_WEIGHTS: cannot load {path} as a DALL-E encoder with '
                                    f'TOKENIZER_HIDDEN {pretrain.TOKENIZER_HIDDEN}, TOKENIZER_BLOCKS_PER_GROUP '
                                    f'{pretrain.TOKENIZER_BLOCKS_PER_GROUP}, VOCAB_SIZE {pretrain.VOCAB_SIZE}: '
                                    f'{err}') from err
    return tokenizer  # frozen, in eval mode


def _vqkd_tokenizer_for(config) -> nn.Layer:
    """BEiT v2's VQ-KD tokenizer of VQKD.*, seeing PRETRAIN.SECOND_INPUT_SIZE pixels."""
    vqkd, path = config.VQKD, config.PRETRAIN.TOKENIZER_WEIGHTS or None
    shape = dict(img_size=config.PRETRAIN.SECOND_INPUT_SIZE, patch_size=vqkd.PATCH_SIZE,
                 in_chans=config.DATA.IMAGE_CHANNELS, embed_dim=vqkd.EMBED_DIM, depth=vqkd.DEPTH,
                 num_heads=vqkd.NUM_HEADS, mlp_ratio=vqkd.MLP_RATIO, codebook_size=vqkd.CODEBOOK_SIZE,
                 codebook_dim=vqkd.CODEBOOK_DIM)
    try:
        return build_vqkd_tokenizer(path, trust_pickle=config.TRUST_PICKLE, **shape)
    except VQKDWeightsError as err:  # missing, unreadable or another size: named by the config keys
        raise VQKDWeightsError(f'PRETRAIN.TOKENIZER_WEIGHTS: cannot load {path} as a VQ-KD tokenizer of '
                               f'PRETRAIN.SECOND_INPUT_SIZE {shape["img_size"]} px and VQKD.PATCH_SIZE '
                               f'{vqkd.PATCH_SIZE}, EMBED_DIM {vqkd.EMBED_DIM}, DEPTH {vqkd.DEPTH}, NUM_HEADS '
                               f'{vqkd.NUM_HEADS}, MLP_RATIO {vqkd.MLP_RATIO}, CODEBOOK_SIZE {vqkd.CODEBOOK_SIZE}, '
                               f'CODEBOOK_DIM {vqkd.CODEBOOK_DIM}: {err}') from err


class MaskedImageModelingObjective:
    """A pre-training batch (patch view, tokenizer view, mask, masked positions) -> (loss, counts).

    The tokenizer labels each patch with its visual token (no gradient, float32); the loss is the cross entropy
    of lm_head's logits against those labels over all masked patches of the batch, as unilm averages it. Counts,
    summed over micro-batches and processes: [loss sum, correct predictions, masked patches, images].

    Every image ships NUM_MASK_PATCHES positions; the first ``mask.sum()`` of an image's are its masked patches
    and any others pad a short mask (masking_generator.masked_positions) and count for nothing. The step's
    shapes never depend on the mask's values and nothing is copied from the host.
    """

    metric = 'mlm_acc'
    logged = ('loss', 'mlm_acc')
    num_counts = 4
    batch_draws = None  # the masks come with the samples

    def __init__(self, tokenizer: nn.Layer):
        self.tokenizer = tokenizer

    @paddle.no_grad()
    def visual_tokens(self, tokenizer_view: paddle.Tensor) -> paddle.Tensor:
        """int64 [B, N]: the tokenizer's codebook index of every patch."""
        return self.tokenizer.get_codebook_indices(tokenizer_view)

    def masked_labels(self, batch) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """The visual tokens at the shipped positions [B * M], which of them are real (float32 [B * M]) and how
        many (float32 scalar)."""
        _, tokenizer_view, mask, positions = batch
        labels = paddle.take_along_axis(self.visual_tokens(tokenizer_view), positions, axis=1).reshape([-1])
        real = real_positions(mask, positions.shape[1])
        return labels, real, real.sum()

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, _, mask, positions = batch
        labels, real, num_masked = self.masked_labels(batch)
        loss, correct = masked_cross_entropy(amp.forward(model, images, mask, positions), labels, real, num_masked)
        with paddle.no_grad():
            num_masked = num_masked.astype('float64')
            counts = paddle.stack([loss.detach().astype('float64') * num_masked, correct.astype('float64'),
                                   num_masked, paddle.full([], images.shape[0], dtype='float64')])
        return loss, counts

    @staticmethod
    def summarise(totals) -> dict:
        loss_sum, correct, num_masked, num_images = totals
        return {'loss': loss_sum / max(num_masked, 1.0), 'mlm_acc': correct / max(num_masked, 1.0),
                'num_samples': int(num_images), 'num_masked': int(num_masked)}

    def reseed(self, seed: int) -> None:
        """Nothing of the objective is random."""


class ClsBranchObjective(MaskedImageModelingObjective):
    """BEiT v2's objective (model with PRETRAIN.CLS_PT): the main branch's cross entropy plus the CLS branch's, on
    the same masked patches, as unilm sums them. ``loss`` is that sum and ``mlm_acc`` the main branch's accuracy;
    ``loss_main``, ``loss_cls`` and ``mlm_acc_cls`` are unilm's loss_1, loss_2 and mlm_acc_2. Counts: v1's four
    (with the summed loss), then [main loss sum, CLS loss sum, CLS correct predictions]."""

    logged = ('loss', 'mlm_acc', 'loss_main', 'loss_cls', 'mlm_acc_cls')
    num_counts = 7

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, _, mask, positions = batch
        labels, real, num_masked = self.masked_labels(batch)
        losses, corrects = zip(*(masked_cross_entropy(logits, labels, real, num_masked)
                                 for logits in amp.forward(model, images, mask, positions)))
        loss = losses[0] + losses[1]
        with paddle.no_grad():
            masked = num_masked.astype('float64')
            loss_sums = [part.detach().astype('float64') * masked for part in (loss, *losses)]
            counts = paddle.stack([loss_sums[0], corrects[0].astype('float64'), masked,
                                   paddle.full([], images.shape[0], dtype='float64'), loss_sums[1], loss_sums[2],
                                   corrects[1].astype('float64')])
        return loss, counts

    @staticmethod
    def summarise(totals) -> dict:
        loss_main, loss_cls, correct_cls = totals[4:]
        num_masked = max(totals[2], 1.0)
        return {**MaskedImageModelingObjective.summarise(totals[:4]), 'loss_main': loss_main / num_masked,
                'loss_cls': loss_cls / num_masked, 'mlm_acc_cls': correct_cls / num_masked}


def masked_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, real: paddle.Tensor,
                         num_masked: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The mean cross entropy of ``logits`` [B * M, V] over the real positions, and their correct predictions (no
    gradient)."""
    loss = (cross_entropy_rows(logits, labels) * real).sum() / paddle.clip(num_masked, min=1.0)
    with paddle.no_grad():
        correct = ((logits.argmax(axis=-1) == labels).astype('float32') * real).sum()
    return loss, correct


def real_positions(mask: paddle.Tensor, count: int) -> paddle.Tensor:
    """float32 [B * count]: 1 for the shipped positions that are masked patches, 0 for the padding of short masks."""
    per_image = mask.astype('int64').sum(axis=1, keepdim=True)
    return (paddle.arange(count, dtype='int64').unsqueeze(0) < per_image).astype('float32').reshape([-1])


def _masked_image_modeling_objective(config, world: World) -> MaskedImageModelingObjective:
    objective = ClsBranchObjective if config.PRETRAIN.CLS_PT else MaskedImageModelingObjective
    return objective(build_tokenizer_for(config))


PRETRAINING = Task('masked image modeling pre-training', build_beit_pretrain, get_pretraining_dataset, None,
                   _masked_image_modeling_objective, validate_pretraining_config,
                   curves=(Curve('train', 'mlm_acc', 'train MLM (masked patches)', percent=True),
                           Curve('train', 'mlm_acc_cls', 'train MLM, CLS branch (BEiT v2)', percent=True)))
