"""The BEiT masked image modeling (MIM) pre-training models, v1 (arXiv 2106.08254, section 2) and v2 with the
CLS-token pre-training branch (arXiv 2208.06366); task_pretrain.py trains them.

The encoder is beit.BeitEncoder; the pre-training model adds a ``mask_token`` that replaces the embeddings of
masked patches and an ``lm_head`` that predicts, at masked positions only, the visual token the tokenizer
(DALL-E for v1, VQ-KD for v2) gives that patch. Parameter names are unilm's, so its ``*_pt22k.pth`` checkpoints
converted by load_pytorch_weights.py (``-mim``) load with ``set_state_dict``, and these models' checkpoints start
fine-tuning through ``-pretrained`` (beit.adapt_state_dict drops the MIM-only tensors and spreads the shared bias).

Both models live here because v2 is v1 plus a branch: same encoder, mask token, gather and builder.
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute

from beit import LAYER_NORM_EPS, BeitEncoder, Block, encoder_kwargs, zeros_
from cpu_runtime import use_fast_blas_kernels

INIT_STD = 0.02
# unilm's pre-training init (beit/ and beit2/ modeling_pretrain.py): a normal of std 0.02 truncated at +-1 std, not
# at +-2 (absolute, i.e. untruncated) as fine-tuning's beit.trunc_normal_; its spread is ~0.0108, not 0.02.
pretrain_trunc_normal_ = nn.initializer.TruncatedNormal(std=INIT_STD, a=-INIT_STD, b=INIT_STD)


class BeitForMaskedImageModeling(BeitEncoder):
    """Encoder + mask token + final ``norm`` + ``lm_head`` over ``vocab_size`` visual tokens."""

    def __init__(self, *, vocab_size: int = 8192, **encoder_args):
        super().__init__(final_norm=True, **encoder_args)
        self.vocab_size = vocab_size
        self.mask_token = self.create_parameter([1, 1, self.embed_dim], default_initializer=pretrain_trunc_normal_)
        self.lm_head = nn.Linear(self.embed_dim, vocab_size)
        self._init_pretraining_weights()

    def _init_pretraining_weights(self) -> None:
        """unilm's pre-training init: cls token, mask token, position embedding, every Linear weight (lm_head
        too) and the patch embedding's conv weight from ``pretrain_trunc_normal_``, their biases zero, then the
        residual outputs of block i scaled by 1/sqrt(2i); LayerNorms and relative position tables as built."""
        for tensor in (self.cls_token, self.mask_token, self.pos_embed):
            if tensor is not None:
                pretrain_trunc_normal_(tensor)
        for layer in self.sublayers():
            if isinstance(layer, (nn.Linear, nn.Conv2D)):
                pretrain_trunc_normal_(layer.weight)
                if layer.bias is not None:
                    zeros_(layer.bias)
        for layer_id, block in enumerate(self.blocks, start=1):
            for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
                weight.set_value(weight / math.sqrt(2.0 * layer_id))

    def forward_tokens(self, images: paddle.Tensor, mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """All tokens after ``norm`` [B, N+1, D]; patches where ``mask`` [B, N] is true enter as the mask token."""
        return self.encode(self.masked_patches(images, mask))

    def masked_patches(self, images: paddle.Tensor, mask: paddle.Tensor | None) -> paddle.Tensor:
        """Patch embeddings [B, N, D], the mask token where ``mask`` [B, N] is true."""
        x = self.patch_embed(images)
        if mask is None:
            return x
        weight = mask.unsqueeze(-1).astype(x.dtype)
        return x * (1.0 - weight) + self.mask_token.astype(x.dtype) * weight

    def forward(self, images: paddle.Tensor, mask: paddle.Tensor, positions: paddle.Tensor) -> paddle.Tensor:
        """Visual-token logits [B * M, vocab_size] of the patches at ``positions`` (int64 [B, M], each image's
        masked patch indices), in (image, position) order. A gather, so the shape does not depend on the mask's
        values: boolean-mask indexing would make a GPU wait for them."""
        return self.lm_head(gather_positions(self.forward_tokens(images, mask), positions))


def gather_positions(tokens: paddle.Tensor, positions: paddle.Tensor) -> paddle.Tensor:
    """The patch tokens of ``tokens`` [B, N+1, D] (token 0 is cls) at ``positions`` [B, M]: [B * M, D]."""
    patch_tokens = tokens[:, 1:]
    batch, num_patches, dim = patch_tokens.shape
    rows = positions + paddle.arange(batch, dtype=positions.dtype).unsqueeze(-1) * num_patches
    return paddle.gather(patch_tokens.reshape([-1, dim]), rows.reshape([-1]))


def check_cls_branch(*, depth: int, early_layers: int, head_layers: int) -> None:
    """Refuse CLS-branch settings that cannot work: the branch takes the patch tokens after block ``early_layers``
    (1 to ``depth``: unilm's model fails on any other value), and without a head block the cls token never
    reaches the patch positions (unilm runs it, but the branch's loss would not train the cls token)."""
    if not 1 <= early_layers <= depth:
        raise ValueError(f'early_layers {early_layers} is outside [1, {depth}] (the depth): the CLS branch takes '
                         'the patch tokens after that many blocks')
    if head_layers < 1:
        raise ValueError(f'head_layers {head_layers} is below 1: the CLS branch needs a block for the cls token '
                         'to reach the patches')


class BeitV2ForMaskedImageModeling(BeitForMaskedImageModeling):
    """BEiT v2's MIM model (unilm's ``VisionTransformerForMaskedImageModelingCLS``): the v1 model plus
    ``cls_pt_layers``, ``head_layers`` blocks over the final cls token joined to the patch tokens after block
    ``early_layers``. The branch sees the patches only as they were that early, so its predictions need what
    the final cls token carries: that trains the cls token to aggregate the image. With ``shared_lm_head`` the
    branch uses ``norm`` and ``lm_head``, otherwise its own ``cls_pt_norm`` and ``cls_pt_lm_head``."""

    def __init__(self, *, vocab_size: int, early_layers: int, head_layers: int = 2, shared_lm_head: bool = True,
                 **encoder_args):
        check_cls_branch(depth=encoder_args['depth'], early_layers=early_layers, head_layers=head_layers)
        super().__init__(vocab_size=vocab_size, **encoder_args)
        self.early_layers = early_layers
        self.shared_lm_head = shared_lm_head
        self.cls_pt_layers = nn.LayerList(_cls_branch_blocks(early_layers, head_layers, encoder_args,
                                                             self.patch_embed.grid))
        if not shared_lm_head:
            self.cls_pt_norm = nn.LayerNorm(self.embed_dim, epsilon=LAYER_NORM_EPS)
            self.cls_pt_lm_head = nn.Linear(self.embed_dim, vocab_size, weight_attr=pretrain_trunc_normal_,
                                            bias_attr=zeros_)

    def forward_branches(self, images: paddle.Tensor,
                         mask: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
        """All tokens [B, N+1, D] of the main branch and of the CLS branch, each after its norm."""
        x, (early,) = self.run_blocks(self.masked_patches(images, mask), taken=(self.early_layers - 1,))
        branch = paddle.concat([x[:, :1], early[:, 1:]], axis=1)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.cls_pt_layers:
            if self.recompute and self.training:
                branch = recompute(block, branch, shared_bias, use_reentrant=False)
            else:
                branch = block(branch, shared_bias)
        return self.norm(x), (self.norm if self.shared_lm_head else self.cls_pt_norm)(branch)

    def forward(self, images: paddle.Tensor, mask: paddle.Tensor,
                positions: paddle.Tensor) -> list[paddle.Tensor]:
        """[main, cls branch]: the logits [B * M, vocab_size] at ``positions`` (as v1's) of each branch; a list,
        as engine.Amp.forward casts a list of outputs."""
        tokens, branch = self.forward_branches(images, mask)
        branch_head = self.lm_head if self.shared_lm_head else self.cls_pt_lm_head
        return [self.lm_head(gather_positions(tokens, positions)), branch_head(gather_positions(branch, positions))]


def _cls_branch_blocks(early_layers: int, head_layers: int, encoder_args: dict, grid) -> list[Block]:
    """The CLS branch's blocks as unilm builds them: the drop-path rates of positions ``early_layers`` onwards in
    a decay over max(depth, early_layers + head_layers) blocks; PyTorch's default Linear init (unilm's
    trunc-normal init ran before they existed), the residual outputs scaled down as blocks ``early_layers`` + 1
    onwards would be."""
    rates = np.linspace(0, encoder_args['drop_path_rate'], max(encoder_args['depth'], early_layers + head_layers))
    blocks = []
    for layer_id in range(early_layers, early_layers + head_layers):
        block = Block(encoder_args['embed_dim'], encoder_args['num_heads'], mlp_ratio=encoder_args['mlp_ratio'],
                      qkv_bias=encoder_args['qkv_bias'], drop_rate=encoder_args['drop_rate'],
                      attn_drop_rate=encoder_args['attn_drop_rate'], drop_path_rate=float(rates[layer_id]),
                      init_values=encoder_args['init_values'],
                      grid=grid if encoder_args['use_rel_pos_bias'] else None, fused_attn=encoder_args['fused_attn'])
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            _torch_default_init(linear)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            weight.set_value(weight / math.sqrt(2.0 * (layer_id + 1)))
        blocks.append(block)
    return blocks


def _torch_default_init(linear: nn.Linear) -> None:
    """PyTorch's nn.Linear init: weight and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(linear.weight.shape[0])  # Paddle's weight is [in, out]
    nn.initializer.Uniform(-bound, bound)(linear.weight)
    if linear.bias is not None:
        nn.initializer.Uniform(-bound, bound)(linear.bias)


def build_beit_pretrain(config) -> BeitForMaskedImageModeling:
    """The pre-training model of ``config``: MODEL.* as for fine-tuning (head options aside), PRETRAIN.VOCAB_SIZE;
    BEiT v2's with the CLS branch (EARLY_LAYERS, HEAD_LAYERS, SHARED_LM_HEAD) when PRETRAIN.CLS_PT, else v1's.
    cpu_runtime's BLAS kernel choice made first, as in build_beit."""
    use_fast_blas_kernels()
    pretrain = config.PRETRAIN
    if pretrain.CLS_PT:
        return BeitV2ForMaskedImageModeling(vocab_size=pretrain.VOCAB_SIZE, early_layers=pretrain.EARLY_LAYERS,
                                            head_layers=pretrain.HEAD_LAYERS, shared_lm_head=pretrain.SHARED_LM_HEAD,
                                            **encoder_kwargs(config))
    return BeitForMaskedImageModeling(vocab_size=pretrain.VOCAB_SIZE, **encoder_kwargs(config))
