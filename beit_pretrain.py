"""BEiT masked image modeling (MIM) pre-training: the model and its objective (arXiv 2106.08254, section 2).

The encoder is beit.BeitEncoder; the pre-training model adds a ``mask_token`` that replaces the embeddings of
masked patches and an ``lm_head`` that predicts, at masked positions only, the visual token the DALL-E
tokenizer gives that patch. Parameter names are unilm's, so its ``*_pt22k.pth`` checkpoints converted by
load_pytorch_weights.py (``-mim``) load with ``set_state_dict``, and this model's checkpoints start fine-tuning
through ``-pretrained`` (beit.adapt_state_dict drops the MIM-only tensors and spreads the shared bias).
"""
import paddle
import paddle.nn as nn

from beit import BeitEncoder, Linear, encoder_kwargs, trunc_normal_
from config import ConfigError
from cpu_runtime import use_fast_blas_kernels
from dall_e import build_tokenizer
from losses import cross_entropy


class BeitForMaskedImageModeling(BeitEncoder):
    """Encoder + mask token + final ``norm`` + ``lm_head`` over ``vocab_size`` visual tokens."""

    def __init__(self, vocab_size: int = 8192, **encoder_args):
        super().__init__(final_norm=True, **encoder_args)
        self.vocab_size = vocab_size
        self.mask_token = self.create_parameter([1, 1, self.embed_dim], default_initializer=trunc_normal_)
        self.lm_head = Linear(self.embed_dim, vocab_size)
        self._init_weights()  # lm_head too: trunc normal .02, no output scaling

    def forward_tokens(self, images: paddle.Tensor, mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """All tokens after ``norm`` [B, N+1, D]; patches where ``mask`` [B, N] is true enter as the mask token."""
        x = self.patch_embed(images)
        if mask is not None:
            weight = mask.unsqueeze(-1).astype(x.dtype)
            x = x * (1.0 - weight) + self.mask_token.astype(x.dtype) * weight
        return self.encode(x)

    def forward(self, images: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        """Visual-token logits [number of masked patches in the batch, vocab_size], in (image, position) order."""
        patch_tokens = self.forward_tokens(images, mask)[:, 1:]
        return self.lm_head(patch_tokens[mask.astype('bool')])


def build_beit_pretrain(config) -> BeitForMaskedImageModeling:
    """The pre-training model of ``config``: MODEL.* as for fine-tuning (head options aside), PRETRAIN.VOCAB_SIZE;
    cpu_runtime's BLAS kernel choice made first, as in build_beit."""
    use_fast_blas_kernels()
    return BeitForMaskedImageModeling(vocab_size=config.PRETRAIN.VOCAB_SIZE, **encoder_kwargs(config))


def build_tokenizer_for(config) -> nn.Layer:
    """The frozen DALL-E encoder of ``config.PRETRAIN``: converted weights, or random ones (seeded by SEED, so every
    process and every resumed run has the same) when PRETRAIN.RANDOM_TOKENIZER allows it."""
    pretrain = config.PRETRAIN
    path = pretrain.TOKENIZER_WEIGHTS or None
    if path is None:
        paddle.seed(config.SEED)
    try:
        tokenizer = build_tokenizer(path, n_hid=pretrain.TOKENIZER_HIDDEN,
                                    n_blk_per_group=pretrain.TOKENIZER_BLOCKS_PER_GROUP,
                                    vocab_size=pretrain.VOCAB_SIZE)
    except ValueError as err:  # dall_e.TokenizerWeightsError: missing, unreadable or another size
        raise ConfigError(f'PRETRAIN.TOKENIZER_WEIGHTS: cannot load {path} as a DALL-E encoder with '
                          f'TOKENIZER_HIDDEN {pretrain.TOKENIZER_HIDDEN}, TOKENIZER_BLOCKS_PER_GROUP '
                          f'{pretrain.TOKENIZER_BLOCKS_PER_GROUP}, VOCAB_SIZE {pretrain.VOCAB_SIZE}: {err}') from err
    return tokenizer  # frozen, in eval mode


class MaskedImageModelingObjective:
    """A pre-training batch (patch view, tokenizer view, mask) -> (loss, counts).

    The tokenizer labels each patch with its visual token (no gradient, float32); the loss is the cross entropy
    of lm_head's logits against those labels over all masked patches of the batch, as unilm averages it. Counts,
    summed over micro-batches and processes: [loss sum, correct predictions, masked patches, images].
    """

    metric = 'mlm_acc'
    num_counts = 4

    def __init__(self, tokenizer: nn.Layer):
        self.tokenizer = tokenizer

    @paddle.no_grad()
    def visual_tokens(self, tokenizer_view: paddle.Tensor) -> paddle.Tensor:
        """int64 [B, N]: the tokenizer's codebook index of every patch."""
        return self.tokenizer.get_codebook_indices(tokenizer_view)

    def __call__(self, model: nn.Layer, batch, amp) -> tuple[paddle.Tensor, paddle.Tensor]:
        images, tokenizer_view, mask = batch
        mask = mask.astype('bool')
        labels = self.visual_tokens(tokenizer_view)[mask]
        with amp.autocast():
            logits = model(images, mask)
        logits = logits.astype('float32')
        loss = cross_entropy(logits, labels)
        with paddle.no_grad():
            num_masked = labels.shape[0]
            correct = (logits.argmax(axis=-1) == labels).astype('float64').sum()
            counts = paddle.stack([loss.detach().astype('float64') * num_masked, correct,
                                   paddle.to_tensor(float(num_masked), dtype='float64'),
                                   paddle.to_tensor(float(images.shape[0]), dtype='float64')])
        return loss, counts

    @staticmethod
    def summarise(totals) -> dict:
        loss_sum, correct, num_masked, num_images = totals
        return {'loss': loss_sum / max(num_masked, 1.0), 'mlm_acc': correct / max(num_masked, 1.0),
                'num_samples': int(num_images), 'num_masked': int(num_masked)}

    def reseed(self, seed: int) -> None:
        """Nothing of the objective is random."""
