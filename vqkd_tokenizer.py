"""The VQ-KD visual tokenizer of BEiT v2 (arXiv 2208.06366) in Paddle, for inference: BEiT v2's MIM targets.

An image in [0, 1] is mapped to [-1, 1]; a ViT encoder (absolute position embedding, no relative position bias,
no layer scale, q/v biases) gives patch tokens, normalised by ``fc_norm`` (the cls token dropped); the
``encode_task_layer`` (Linear, Tanh, Linear) maps them to ``codebook_dim`` dimensions, which are L2-normalised;
each patch's token is the codebook row at the smallest squared distance ``|z|^2 + |e|^2 - 2 z.e`` (unilm's
expression, with the codebook as stored: training keeps its rows at unit length, lookup does not renormalise).

Parameter names are those of unilm's ``VQKD`` state dict (``encoder.blocks.0.attn.q_bias``,
``encode_task_layer.0.weight``, ``quantize.embedding.weight``), Linear weights in Paddle's [in, out] layout;
``load_vqkd_weights.py`` converts unilm's released files. The encoder's blocks are beit.py's (``BeitEncoder``:
the same function with relative position bias off and layer scale off).
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import weights_file
from beit import LAYER_NORM_EPS, BeitEncoder, trunc_normal_
from errors import BadInputError


class VQKDWeightsError(BadInputError):
    """Tokenizer weights that are missing, unreadable or not a VQ-KD tokenizer of the asked size."""


class VQKDEncoder(BeitEncoder):
    """unilm's encoder with ``use_mean_pooling`` and no head: the blocks, then ``fc_norm`` on the patch tokens
    (``norm`` is the identity)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_rate=0.0,
                         attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None, use_abs_pos_emb=True,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=False, final_norm=False,
                         fused_attn=False, recompute=False)
        self.fc_norm = nn.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS)
        self._init_weights()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> normalised patch tokens [B, N, D]."""
        return self.fc_norm(self.encode(self.patch_embed(x))[:, 1:])


class Codebook(nn.Layer):
    """The quantiser's codebook, ``embedding.weight`` [codebook_size, codebook_dim], as unilm names it."""

    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.embedding.weight.set_value(F.normalize(paddle.randn([codebook_size, codebook_dim]), axis=-1))

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        """Unit vectors [B, N, d] -> the id of the nearest code, int64 [B, N]."""
        return nearest_code(z, self.embedding.weight)


def nearest_code(z: paddle.Tensor, codes: paddle.Tensor) -> paddle.Tensor:
    """The index of the row of ``codes`` [K, d] nearest to each vector of ``z`` [..., d], int64 [...], by unilm's
    squared distance |z|^2 + |e|^2 - 2 z.e (its ties and rounding, not those of another formula)."""
    distances = ((z * z).sum(-1, keepdim=True) + (codes * codes).sum(-1)
                 - 2 * paddle.matmul(z, codes, transpose_y=True))
    return distances.argmin(axis=-1)


def task_layer(width: int, out_dim: int) -> nn.Sequential:
    """unilm's encode/decode task layer: Linear, Tanh, Linear to ``out_dim``; weights trunc normal .02, biases 0."""
    layers = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))
    for layer in (layers[0], layers[2]):
        trunc_normal_(layer.weight)
        nn.initializer.Constant(0.0)(layer.bias)
    return layers


class VQKDTokenizer(nn.Layer):
    """Images [B, C, H, W] in [0, 1] -> visual token ids [B, (H/p) * (W/p)], patches in row-major order."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, codebook_size: int, codebook_dim: int):
        super().__init__()
        if min(codebook_size, codebook_dim) < 1:
            raise ValueError(f'codebook_size and codebook_dim must be at least 1, got {codebook_size}, '
                             f'{codebook_dim}')
        self.encoder = VQKDEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                   embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.encode_task_layer = task_layer(embed_dim, codebook_dim)
        self.quantize = Codebook(codebook_size, codebook_dim)
        self.codebook_size = codebook_size

    def features(self, images: paddle.Tensor) -> paddle.Tensor:
        """The L2-normalised features [B, N, codebook_dim] that are quantised (before the lookup)."""
        # unilm scales [0, 1] by 255 / 127.5 - 1 (and takes a batch whose max exceeds 1 as 0-255 pixels: here
        # the input is always [0, 1]).
        patch_tokens = self.encoder(images * 2.0 - 1.0)
        return F.normalize(self.encode_task_layer(patch_tokens), axis=-1)

    def tokens(self, images: paddle.Tensor) -> paddle.Tensor:
        """Token ids int64 [B, N]: each patch's nearest code."""
        return self.quantize(self.features(images))

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.tokens(images)

    @paddle.no_grad()
    def get_codebook_indices(self, images: paddle.Tensor) -> paddle.Tensor:
        """The MIM targets, as the DALL-E tokenizer names them: ``tokens`` without a graph."""
        return self.tokens(images)


def check_state_dict_fits(state_dict: dict, model, source: str) -> None:
    weights_file.check_fits(state_dict, model, source, error=VQKDWeightsError, what='this VQ-KD tokenizer')


def build_vqkd_tokenizer(weights_path: str | None = None, *, img_size: int = 224, patch_size: int = 16,
                         in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                         mlp_ratio: float = 4.0, codebook_size: int = 8192, codebook_dim: int = 32,
                         trust_pickle: bool = False) -> VQKDTokenizer:
    """The frozen tokenizer in eval mode (defaults: unilm's ViT-B/16 tokenizers, 8192 x 32 codebook): weights from
    ``weights_path`` (read without running code unless ``trust_pickle``), converted or a main_tokenizer.py training
    checkpoint, which must be of this size, or random weights when it is None (tests, dry runs)."""
    model = VQKDTokenizer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                          depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, codebook_size=codebook_size,
                          codebook_dim=codebook_dim)
    if weights_path is not None:
        state_dict = _read_pdparams(weights_path, trust_pickle)
        check_state_dict_fits(state_dict, model, weights_path)
        model.set_state_dict(state_dict)
    return weights_file.frozen(model)


CODEBOOK = 'quantize.embedding.weight'
TRAINING_ONLY = ('decoder.', 'decode_task_layer.', 'quantize.')  # but CODEBOOK: what tokenizer training adds


def tokenizer_part(checkpoint: dict) -> dict:
    """The tokenizer's tensors of a main_tokenizer.py training checkpoint's model: without the decoder, its task
    layer and the codebook's EMA statistics."""
    return {name: value for name, value in checkpoint['model'].items()
            if name == CODEBOOK or not name.startswith(TRAINING_ONLY)}


def is_training_checkpoint(obj: dict) -> bool:
    return isinstance(obj.get('model'), dict) and 'optimizer' in obj and 'epoch' in obj


def _read_pdparams(path: str, trust_pickle: bool) -> dict:
    """A converted tokenizer's state dict, or the tokenizer part of a tokenizer training checkpoint."""
    state_dict = weights_file.read_state_dict(path, trust_pickle=trust_pickle, what='tokenizer weights',
                                             error=VQKDWeightsError,
                                             converter_hint="convert unilm's vqkd_*.pth with load_vqkd_weights.py, "
                                                            'or train one with main_tokenizer.py')
    return tokenizer_part(state_dict) if is_training_checkpoint(state_dict) else state_dict
