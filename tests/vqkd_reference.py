"""A torch reference of unilm's VQ-KD tokenizer (beit2/modeling_vqkd.py, norm_ema_quantizer.py) for inference,
built from timm's VisionTransformer and plain torch, and the state dict unilm's released files hold.

Facts followed: ``VQKD.pre_process`` ('default') scales a batch whose max is at most 1 by 255, then maps
x / 127.5 - 1; the encoder is unilm's VisionTransformer with ``use_mean_pooling`` (``norm`` the identity,
``fc_norm`` applied to the patch tokens, cls dropped), ``num_classes`` 0, q/v biases (k has none), no layer scale
(``init_values`` 0), LayerNorm eps 1e-6; ``encode_task_layer`` Linear, Tanh, Linear; ``NormEMAVectorQuantizer``
L2-normalises the features and takes the argmin of ``|z|^2 + |e|^2 - 2 z.e`` over the stored codebook.
"""
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

TINY = {'img_size': 32, 'patch_size': 8, 'embed_dim': 64, 'depth': 2, 'num_heads': 4, 'codebook_size': 1024,
        'codebook_dim': 32}
BASE = {'img_size': 224, 'patch_size': 16, 'embed_dim': 768, 'depth': 12, 'num_heads': 12, 'codebook_size': 8192,
        'codebook_dim': 32}
TEACHER_DIM = 512  # CLIP's: the width of decode_task_layer's output


def _vit(*, img_size, patch_size, in_chans, embed_dim, depth, num_heads) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                             global_pool='avg', class_token=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Biases and LayerNorm scales away from timm's zeros and ones, which would hide a misplaced one; k's bias
    back to zero (unilm's attention has none)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith('bias') or name.endswith(('cls_token', 'pos_embed')):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif 'norm' in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            if name.endswith('attn.qkv.bias'):
                param.view(3, -1)[1] = 0


def _unilm_vit_names(vit: VisionTransformer, prefix: str) -> dict:
    """timm's ViT state dict under unilm's names: the qkv bias split into q_bias and v_bias."""
    state_dict = {}
    for name, tensor in vit.state_dict().items():
        if name.endswith('attn.qkv.bias'):
            q_bias, _, v_bias = tensor.view(3, -1)
            stem = name[:-len('qkv.bias')]
            state_dict[f'{prefix}{stem}q_bias'] = q_bias.clone()
            state_dict[f'{prefix}{stem}v_bias'] = v_bias.clone()
        else:
            state_dict[prefix + name] = tensor.clone()
    return state_dict


class UnilmVQKD(torch.nn.Module):
    """unilm's tokenizer path (``get_tokens``) with random weights and a random unit-length codebook."""

    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, codebook_size, codebook_dim,
                 seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.grid = img_size // patch_size
        self.encoder = _vit(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                            depth=depth, num_heads=num_heads)
        self.encode_task_layer = torch.nn.Sequential(torch.nn.Linear(embed_dim, embed_dim), torch.nn.Tanh(),
                                                     torch.nn.Linear(embed_dim, codebook_dim))
        _randomise(self, generator)
        self.codebook = torch.nn.Parameter(F.normalize(torch.randn(codebook_size, codebook_dim,
                                                                   generator=generator), dim=-1))
        self.decoder_args = {'embed_dim': embed_dim, 'num_heads': num_heads, 'codebook_dim': codebook_dim}
        self.eval()

    @staticmethod
    def pre_process(images: torch.Tensor) -> torch.Tensor:
        if images.max() <= 1.0:
            images = images * 255.0
        return images / 127.5 - 1.0

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        tokens = self.encoder.forward_features(self.pre_process(torch.from_numpy(images)))
        patch_tokens = self.encoder.fc_norm(tokens[:, self.encoder.num_prefix_tokens:])
        return F.normalize(self.encode_task_layer(patch_tokens), dim=-1).numpy()

    @torch.no_grad()
    def distances(self, features: np.ndarray) -> np.ndarray:
        """[B, N, codebook_size], unilm's expression in float32."""
        z = torch.from_numpy(features).flatten(0, 1)
        d = z.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1) - 2 * z @ self.codebook.t()
        return d.view(*features.shape[:2], -1).numpy()

    def unilm_state_dict(self, decoder_depth: int = 1, seed: int = 1) -> dict:
        """What a released ``vqkd_encoder_base_decoder_*`` file holds under ``model``: the encoder, the decoder
        (a ViT on the code map with 1x1 patches), both task layers, the codebook with its EMA statistics, and
        the teacher's and the scaling layer's tensors that unilm drops when it loads a tokenizer."""
        generator = torch.Generator().manual_seed(seed)
        embed_dim, codebook_dim = self.decoder_args['embed_dim'], self.decoder_args['codebook_dim']
        decoder = _vit(img_size=self.grid, patch_size=1, in_chans=codebook_dim, embed_dim=embed_dim,
                       depth=decoder_depth, num_heads=self.decoder_args['num_heads'])
        state_dict = {**_unilm_vit_names(self.encoder, 'encoder.'), **_unilm_vit_names(decoder, 'decoder.')}
        for index, layer in ((0, self.encode_task_layer[0]), (2, self.encode_task_layer[2])):
            state_dict[f'encode_task_layer.{index}.weight'] = layer.weight.detach().clone()
            state_dict[f'encode_task_layer.{index}.bias'] = layer.bias.detach().clone()
        for index, shape in ((0, (embed_dim, embed_dim)), (2, (TEACHER_DIM, embed_dim))):
            state_dict[f'decode_task_layer.{index}.weight'] = torch.randn(shape, generator=generator) * 0.02
            state_dict[f'decode_task_layer.{index}.bias'] = torch.zeros(shape[0])
        codebook_size = self.codebook.shape[0]
        state_dict.update({
            'quantize.embedding.weight': self.codebook.detach().clone(),
            'quantize.embedding.cluster_size': torch.rand(codebook_size, generator=generator),
            'quantize.embedding.embed_avg': torch.randn(codebook_size, codebook_dim, generator=generator),
            'quantize.embedding.initted': torch.tensor([1.0]),
            'quantize.cluster_size': torch.rand(codebook_size, generator=generator),
            'teacher_model.visual.proj': torch.randn(embed_dim, TEACHER_DIM, generator=generator),
            'scaling_layer.shift': torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None],
            'scaling_layer.scale': torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]})
        return state_dict


def random_images(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    """Pixels in [0, 1], NCHW float32, as the tokenizer takes them."""
    return np.random.default_rng(seed).random((batch_size, 3, size, size), dtype=np.float32)


def compare_ids(reference: UnilmVQKD, reference_features: np.ndarray, ids: np.ndarray,
                feature_difference: float) -> tuple[int, int]:
    """(positions where the ids differ, positions where the reference's two nearest codes are within float noise).

    Features that differ by ``feature_difference`` (max abs per component) move a squared distance to a unit code
    by at most 2 * sqrt(dim) * feature_difference; twice that plus float32's rounding of distances near 4
    (1e-6) is the noise. An id may differ only where the reference's margin between its best and second-best
    distance is below it; a difference anywhere else fails here.
    """
    distances = reference.distances(reference_features)
    expected = distances.argmin(-1)
    nearest_two = np.sort(distances, axis=-1)[..., :2]
    margins = nearest_two[..., 1] - nearest_two[..., 0]
    noise = 4 * np.sqrt(reference_features.shape[-1]) * feature_difference + 1e-6
    ambiguous = margins < noise
    assert ids.dtype == np.int64 and ids.shape == expected.shape
    differing = ids != expected
    assert not (differing & ~ambiguous).any(), (
        f'ids differ where the nearest codes are clearly apart: margins {margins[differing]}, noise {noise:.3g}')
    return int(differing.sum()), int(ambiguous.sum())
