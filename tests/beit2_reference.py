"""unilm's BEiT v2 pre-training model (beit2/modeling_pretrain.py, ``VisionTransformerForMaskedImageModelingCLS``)
rebuilt from timm's Beit and Block: the oracle of tests/test_beit_pretrain.py's v2 tests. Its state dict has
unilm's names, so it stands for a unilm v2 pre-training file."""
import torch
import torch.nn.functional as TF
from timm.layers import LayerNorm
from timm.models.beit import Beit as TimmBeit
from timm.models.beit import Block as TimmBlock

from timm_reference import with_trained_like_noise


class ClsPretrainReference(TimmBeit):
    """timm's encoder (no head, ``norm`` on all tokens) + unilm's mask token, lm head and CLS branch."""

    def __init__(self, spec: dict, *, vocab_size: int, early_layers: int, head_layers: int, shared_lm_head: bool):
        super().__init__(img_size=spec['IMAGE_SIZE'], patch_size=spec['PATCH_SIZE'], num_classes=0,
                         embed_dim=spec['EMBED_DIM'], depth=spec['DEPTH'], num_heads=spec['NUM_HEADS'],
                         mlp_ratio=spec['MLP_RATIO'], qkv_bias=spec['QKV_BIAS'], init_values=spec['INIT_VALUES'],
                         use_abs_pos_emb=spec['USE_ABS_POS_EMB'], use_rel_pos_bias=spec['USE_REL_POS_BIAS'],
                         use_shared_rel_pos_bias=spec['USE_SHARED_REL_POS_BIAS'], global_pool='token')
        dim = spec['EMBED_DIM']
        self.early_layers = early_layers
        self.shared_lm_head = shared_lm_head
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = torch.nn.Linear(dim, vocab_size)
        window = self.patch_embed.grid_size if spec['USE_REL_POS_BIAS'] else None
        self.cls_pt_layers = torch.nn.ModuleList(
            TimmBlock(dim, spec['NUM_HEADS'], qkv_bias=spec['QKV_BIAS'], mlp_ratio=spec['MLP_RATIO'],
                      init_values=spec['INIT_VALUES'], norm_layer=LayerNorm, window_size=window)
            for _ in range(head_layers))
        if not shared_lm_head:
            self.cls_pt_norm = LayerNorm(dim)
            self.cls_pt_lm_head = torch.nn.Linear(dim, vocab_size)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        """unilm's forward: [main-branch logits, CLS-branch logits] at the masked patches, boolean-mask order."""
        x = self.patch_embed(images)
        weight = masks.unsqueeze(-1).float()
        x = x * (1 - weight) + self.mask_token * weight
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for index, block in enumerate(self.blocks):
            x = block(x, shared_rel_pos_bias=shared_bias)
            if index + 1 == self.early_layers:
                early_patches = x[:, 1:]
        branch = torch.cat([x[:, :1], early_patches], dim=1)  # the FINAL cls token
        for block in self.cls_pt_layers:
            branch = block(branch, shared_rel_pos_bias=shared_bias)
        branch_norm, branch_head = ((self.norm, self.lm_head) if self.shared_lm_head
                                    else (self.cls_pt_norm, self.cls_pt_lm_head))
        return [self.lm_head(self.norm(x)[:, 1:][masks]), branch_head(branch_norm(branch)[:, 1:][masks])]


def reference_model(spec: dict, *, seed: int = 0, **cls_branch) -> ClsPretrainReference:
    """The reference with every parameter random at trained-like magnitudes (zero-initialised tables, biases and
    the mask token too), in eval mode."""
    torch.manual_seed(seed)
    return with_trained_like_noise(ClsPretrainReference(spec, **cls_branch))


def unilm_state_dict(model: ClsPretrainReference) -> dict:
    """What a unilm v2 pre-training file's ``model`` holds: the reference's tensors under unilm's names, plus the
    relative position index buffers unilm saves and timm does not."""
    indices = {name: index for name, index in model.named_buffers() if name.endswith('relative_position_index')}
    return {name: tensor.detach().clone() for name, tensor in {**model.state_dict(), **indices}.items()}


def summed_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """unilm's pre-training loss: the cross-entropy of the main branch plus that of the CLS branch."""
    return sum(TF.cross_entropy(branch, targets) for branch in logits)
