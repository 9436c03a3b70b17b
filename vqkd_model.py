"""BEiT v2's VQ-KD tokenizer as it is trained (unilm's beit2 ``VQKD`` with ``NormEMAVectorQuantizer``): the
inference tokenizer of vqkd_tokenizer.py plus the EMA codebook's statistics, a decoder and its task layer.

- Quantiser: features L2-normalised, the nearest row of an L2-normalised codebook by squared distance. The
  codebook gets no gradient and no optimizer: its rows are buffers, moved in training by an EMA of the unit mean
  of the features each code won in the batch (summed over all processes before the mean), renormalised; a code
  nobody picked keeps its row (its EMA target is itself). ``quantize.cluster_size`` is an EMA of the per-code
  counts (unilm's usage statistic), updated in training only (unilm also moves it in evaluation).
- k-means init (VQKD.KMEANS_INIT): on the first training batch, VQKD.KMEANS_ITERS iterations of cosine k-means
  from rows drawn without replacement (with replacement when the batch has fewer features than codes), an empty
  cluster keeping its mean; the counts go to ``quantize.embedding.cluster_size``, ``initted`` to 1. With several
  processes rank 0's result is broadcast, so every process holds the same codebook (unilm lets each rank run its
  own and keeps them apart).
- Loss: BETA x mean squared distance between the features and their (detached) codes, the codes passed on with
  the straight-through estimator; the decoder (a ViT with 1 px patches over the code grid) and
  ``decode_task_layer`` (Linear, Tanh, Linear) reconstruct the teacher's features (task_tokenizer.py's loss).

Names are unilm's (``quantize.embedding.weight``, ``quantize.embedding.cluster_size``, ``.embed_avg``,
``.initted``, ``quantize.cluster_size``, ``decoder.*``, ``decode_task_layer.*``), so a training checkpoint is
a unilm-layout state dict: vqkd_tokenizer.build_vqkd_tokenizer reads it as it is. ``embed_avg`` is kept for the
names only (unilm's NormEMA path never reads or moves it).
"""
from collections.abc import Callable

import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

import weights_file
from beit import CheckpointMismatchError
from vqkd_tokenizer import VQKDEncoder, VQKDTokenizer, nearest_code, task_layer


def sum_over_processes(tensor: paddle.Tensor) -> paddle.Tensor:
    """The element-wise sum over the processes (in place), the tensor itself with one process."""
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def from_rank_zero(tensor: paddle.Tensor) -> paddle.Tensor:
    """Rank 0's values on every process (in place)."""
    if dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def initial_rows(num_samples: int, num_clusters: int) -> paddle.Tensor:
    """unilm's k-means start: ``num_clusters`` distinct sample indices (a random permutation's first), or indices
    drawn with replacement when there are fewer samples than clusters (Paddle's generator)."""
    if num_samples >= num_clusters:
        return paddle.randperm(num_samples)[:num_clusters]
    return paddle.randint(0, num_samples, [num_clusters])


def cosine_kmeans(samples: paddle.Tensor, start: paddle.Tensor, num_iters: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(unit means [K, d], float32 counts [K] of the last assignment): k-means by the largest dot product from the
    rows ``start`` of the unit ``samples`` [n, d]; an empty cluster keeps its mean."""
    means = samples[start]
    num_clusters = means.shape[0]
    counts = paddle.zeros([num_clusters], dtype='float32')
    for _ in range(num_iters):
        buckets = paddle.matmul(samples, means, transpose_y=True).argmax(axis=-1)
        counts = paddle.bincount(buckets, minlength=num_clusters).astype('float32')
        sums = paddle.zeros_like(means).index_add(buckets, 0, samples)
        new_means = F.normalize(sums / paddle.clip(counts, min=1.0).unsqueeze(1), axis=-1)
        means = paddle.where((counts == 0).unsqueeze(1), means, new_means)
    return means, counts


class EmaCodebook(nn.Layer):
    """unilm's ``EmbeddingEMA``: the codebook ``weight`` [K, d] and its statistics, all buffers."""

    def __init__(self, codebook_size: int, codebook_dim: int, *, kmeans_init: bool):
        super().__init__()
        weight = (paddle.zeros([codebook_size, codebook_dim]) if kmeans_init
                  else F.normalize(paddle.randn([codebook_size, codebook_dim]), axis=-1))
        self.register_buffer('weight', weight)
        self.register_buffer('cluster_size', paddle.zeros([codebook_size]))
        self.register_buffer('embed_avg', weight.clone())
        self.register_buffer('initted', paddle.to_tensor([0.0 if kmeans_init else 1.0]))


class NormEmaQuantizer(nn.Layer):
    """Unit features [B, N, d] -> (codes passed straight through [B, N, d], BETA x commitment loss, ids [B, N]);
    in training the EMA update of the codebook. ``reduce`` and ``broadcast`` are the cross-process sum and rank 0's
    copy (stand-ins in tests)."""

    def __init__(self, codebook_size: int, codebook_dim: int, *, beta: float, decay: float, kmeans_init: bool,
                 kmeans_iters: int, reduce: Callable = sum_over_processes, broadcast: Callable = from_rank_zero):
        super().__init__()
        self.embedding = EmaCodebook(codebook_size, codebook_dim, kmeans_init=kmeans_init)
        self.register_buffer('cluster_size', paddle.zeros([codebook_size]))
        self.codebook_size, self.beta, self.decay, self.kmeans_iters = codebook_size, beta, decay, kmeans_iters
        self.reduce, self.broadcast = reduce, broadcast
        self._initialised = False

    def nearest(self, z: paddle.Tensor) -> paddle.Tensor:
        """The id of each unit feature's nearest code, int64 [...]."""
        return nearest_code(z, self.embedding.weight)

    def initialised(self) -> bool:
        """Whether the codebook has had its k-means start (``initted``, set once: read from the device until it
        is, so a long run does not wait for the device at every step)."""
        if not self._initialised:
            self._initialised = bool(self.embedding.initted.item())
        return self._initialised

    @paddle.no_grad()
    def init_codebook(self, flat: paddle.Tensor) -> None:
        """k-means on the first batch's features ``flat`` [n, d], once (``initted``)."""
        means, counts = cosine_kmeans(flat, initial_rows(flat.shape[0], self.codebook_size), self.kmeans_iters)
        self.embedding.weight.set_value(self.broadcast(means))
        self.embedding.cluster_size.set_value(self.broadcast(counts))
        self.embedding.initted.set_value(paddle.ones([1]))
        self._initialised = True

    @paddle.no_grad()
    def ema_update(self, flat: paddle.Tensor, ids: paddle.Tensor) -> None:
        """Move the codebook towards the unit mean of the features each code won, over all processes."""
        one_hot = F.one_hot(ids, self.codebook_size).astype(flat.dtype)
        bins = self.reduce(one_hot.sum(0))
        decay = self.decay
        self.cluster_size.set_value(self.cluster_size * decay + bins * (1 - decay))
        unused = (bins == 0).unsqueeze(1)
        sums = self.reduce(paddle.matmul(one_hot, flat, transpose_x=True))
        means = F.normalize(sums / paddle.clip(bins, min=1.0).unsqueeze(1), axis=-1)
        weight = self.embedding.weight
        target = paddle.where(unused, weight, means)
        weight.set_value(F.normalize(weight * decay + target * (1 - decay), axis=-1))

    def forward(self, z: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        z = F.normalize(z.astype('float32'), axis=-1)
        flat = z.reshape([-1, z.shape[-1]])
        if self.training and not self.initialised():
            self.init_codebook(flat.detach())
        ids = self.nearest(flat)
        quantized = paddle.gather(self.embedding.weight, ids).reshape(z.shape)  # before the update, as unilm
        if self.training:
            self.ema_update(flat.detach(), ids)
        loss = self.beta * F.mse_loss(quantized.detach(), z)
        return z + (quantized - z).detach(), loss, ids.reshape(z.shape[:-1])


class VQKD(VQKDTokenizer):
    """Images [B, 3, H, W] in [0, 1] -> (reconstructed teacher features [B, N, teacher_dim], quantiser loss, token
    ids [B, N]); ``tokens`` and ``features`` are the inference tokenizer's."""

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, codebook_size: int, codebook_dim: int, decoder_depth: int, teacher_dim: int,
                 beta: float = 1.0, decay: float = 0.99, kmeans_init: bool = True, kmeans_iters: int = 10):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, codebook_size=codebook_size,
                         codebook_dim=codebook_dim)
        self.quantize = NormEmaQuantizer(codebook_size, codebook_dim, beta=beta, decay=decay,
                                         kmeans_init=kmeans_init, kmeans_iters=kmeans_iters)
        self.grid = img_size // patch_size
        self.decoder = VQKDEncoder(img_size=self.grid, patch_size=1, in_chans=codebook_dim, embed_dim=embed_dim,
                                   depth=decoder_depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.decode_task_layer = task_layer(embed_dim, teacher_dim)

    def no_weight_decay(self) -> set:
        """unilm's list (its codebook entry is a buffer here, outside the optimizer anyway)."""
        return {'encoder.cls_token', 'encoder.pos_embed', 'decoder.cls_token', 'decoder.pos_embed'}

    def tokens(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.quantize.nearest(self.features(images))

    def fit_pretrained(self, state_dict: dict, rel_pos_interp: str, complete: bool) -> tuple[dict, list]:
        """-pretrained (checkpoint.load_pretrained's hook): a training checkpoint of this very model, whole."""
        weights_file.check_fits(state_dict, self, 'the file', error=CheckpointMismatchError,
                                what='this VQ-KD training model')
        return state_dict, []

    def encode(self, images: paddle.Tensor) -> paddle.Tensor:
        """The features before the quantiser [B, N, codebook_dim]: the encoder (under any autocast), its task layer
        in float32 as unilm's."""
        patch_tokens = self.encoder(images * 2.0 - 1.0).astype('float32')
        with paddle.amp.auto_cast(enable=False):
            return self.encode_task_layer(patch_tokens)

    def decode(self, quantized: paddle.Tensor) -> paddle.Tensor:
        """Codes [B, N, d] (row-major grid) -> reconstructed teacher features [B, N, teacher_dim]."""
        grid_map = quantized.transpose([0, 2, 1]).reshape([0, quantized.shape[-1], self.grid, self.grid])
        return self.decode_task_layer(self.decoder(grid_map))

    def forward(self, images: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        quantized, quantizer_loss, ids = self.quantize(self.encode(images))
        return self.decode(quantized), quantizer_loss, ids


def build_vqkd(config, teacher_dim: int) -> VQKD:
    """The training model of ``config``'s VQKD.* keys at DATA.IMAGE_SIZE, reconstructing ``teacher_dim`` features."""
    vqkd = config.VQKD
    return VQKD(img_size=config.DATA.IMAGE_SIZE, patch_size=vqkd.PATCH_SIZE, embed_dim=vqkd.EMBED_DIM,
                depth=vqkd.DEPTH, num_heads=vqkd.NUM_HEADS, mlp_ratio=vqkd.MLP_RATIO,
                codebook_size=vqkd.CODEBOOK_SIZE, codebook_dim=vqkd.CODEBOOK_DIM, decoder_depth=vqkd.DECODER_DEPTH,
                teacher_dim=teacher_dim, beta=vqkd.BETA, decay=vqkd.EMA_DECAY, kmeans_init=vqkd.KMEANS_INIT,
                kmeans_iters=vqkd.KMEANS_ITERS)
