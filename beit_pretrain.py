"""The BEiT masked image modeling (MIM) pre-training model (arXiv 2106.08254, section 2); task_pretrain.py trains it.

The encoder is beit.BeitEncoder; the pre-training model adds a ``mask_token`` that replaces the embeddings of
masked patches and an ``lm_head`` that predicts, at masked positions only, the visual token the DALL-E
tokenizer gives that patch. Parameter names are unilm's, so its ``*_pt22k.pth`` checkpoints converted by
load_pytorch_weights.py (``-mim``) load with ``set_state_dict``, and this model's checkpoints start fine-tuning
through ``-pretrained`` (beit.adapt_state_dict drops the MIM-only tensors and spreads the shared bias).
"""
import paddle
import paddle.nn as nn

from beit import BeitEncoder, encoder_kwargs, trunc_normal_
from cpu_runtime import use_fast_blas_kernels


class BeitForMaskedImageModeling(BeitEncoder):
    """Encoder + mask token + final ``norm`` + ``lm_head`` over ``vocab_size`` visual tokens."""

    def __init__(self, *, vocab_size: int = 8192, **encoder_args):
        super().__init__(final_norm=True, **encoder_args)
        self.vocab_size = vocab_size
        self.mask_token = self.create_parameter([1, 1, self.embed_dim], default_initializer=trunc_normal_)
        self.lm_head = nn.Linear(self.embed_dim, vocab_size)
        self._init_weights()  # lm_head too: trunc normal .02, no output scaling

    def forward_tokens(self, images: paddle.Tensor, mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """All tokens after ``norm`` [B, N+1, D]; patches where ``mask`` [B, N] is true enter as the mask token."""
        x = self.patch_embed(images)
        if mask is not None:
            weight = mask.unsqueeze(-1).astype(x.dtype)
            x = x * (1.0 - weight) + self.mask_token.astype(x.dtype) * weight
        return self.encode(x)

    def forward(self, images: paddle.Tensor, mask: paddle.Tensor, positions: paddle.Tensor) -> paddle.Tensor:
        """Visual-token logits [B * M, vocab_size] of the patches at ``positions`` (int64 [B, M], each image's
        masked patch indices), in (image, position) order. A gather, so the shape does not depend on the mask's
        values: boolean-mask indexing would make a GPU wait for them."""
        patch_tokens = self.forward_tokens(images, mask)[:, 1:]
        batch, num_patches, dim = patch_tokens.shape
        rows = positions + paddle.arange(batch, dtype=positions.dtype).unsqueeze(-1) * num_patches
        return self.lm_head(paddle.gather(patch_tokens.reshape([-1, dim]), rows.reshape([-1])))


def build_beit_pretrain(config) -> BeitForMaskedImageModeling:
    """The pre-training model of ``config``: MODEL.* as for fine-tuning (head options aside), PRETRAIN.VOCAB_SIZE;
    cpu_runtime's BLAS kernel choice made first, as in build_beit."""
    use_fast_blas_kernels()
    return BeitForMaskedImageModeling(vocab_size=config.PRETRAIN.VOCAB_SIZE, **encoder_kwargs(config))
