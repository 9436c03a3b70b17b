"""A torch reference of unilm's VQ-KD tokenizer TRAINING step (beit2/modeling_vqkd.py ``VQKD.forward``,
norm_ema_quantizer.py ``NormEMAVectorQuantizer``, ``kmeans``), built from timm's VisionTransformer and plain torch.

Facts followed: images in [0, 1] are scaled to [-1, 1]; encoder = ViT with fc_norm on the patch tokens, then
encode_task_layer; the quantiser L2-normalises, initialises the codebook once (``initted``) by cosine k-means
(argmax of dot products, empty clusters keep their mean, means renormalised, the last counts stored in
``embedding.cluster_size``) from given start rows, picks the argmin of ``|z|^2 + |e|^2 - 2 z.e``, gathers the codes
BEFORE the update, then in training: bins = one-hot counts (all-reduced), ``cluster_size`` EMA of bins, per-code
sums of the features (all-reduced) / max(bins, 1), L2-normalised, unused codes' targets = their current rows,
codebook = l2norm(decay * codebook + (1 - decay) * target); loss = beta * mse(codes.detach(), z); codes passed on
straight-through; decoder = ViT with 1 px patches over the code map (channels = codebook_dim), fc_norm on its patch
tokens, decode_task_layer; reconstruction loss = mean over patches of 1 - cos(rec, target).
"""
import numpy as np
import torch
import torch.nn.functional as F

from vqkd_reference import _randomise, _unilm_vit_names, _vit


def kmeans_reference(samples: torch.Tensor, start: torch.Tensor, num_iters: int) -> tuple:
    means = samples[start]
    num_clusters = means.shape[0]
    bins = torch.zeros(num_clusters)
    for _ in range(num_iters):
        buckets = (samples @ means.t()).max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        empty = bins == 0
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new_means = F.normalize(sums / bins.masked_fill(empty, 1)[:, None], dim=-1)
        means = torch.where(empty[:, None], means, new_means)
    return means, bins.float()


class ReferenceVQKDTraining(torch.nn.Module):
    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, codebook_size, codebook_dim,
                 decoder_depth, teacher_dim, beta=1.0, decay=0.99, kmeans_iters=10, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.grid = img_size // patch_size
        self.encoder = _vit(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads)
        self.encode_task_layer = torch.nn.Sequential(torch.nn.Linear(embed_dim, embed_dim), torch.nn.Tanh(),
                                                     torch.nn.Linear(embed_dim, codebook_dim))
        self.decoder = _vit(img_size=self.grid, patch_size=1, in_chans=codebook_dim, embed_dim=embed_dim,
                            depth=decoder_depth, num_heads=num_heads)
        self.decode_task_layer = torch.nn.Sequential(torch.nn.Linear(embed_dim, embed_dim), torch.nn.Tanh(),
                                                     torch.nn.Linear(embed_dim, teacher_dim))
        _randomise(self, generator)
        self.codebook = F.normalize(torch.randn(codebook_size, codebook_dim, generator=generator), dim=-1)
        self.cluster_size = torch.zeros(codebook_size)
        self.embed_cluster_size = torch.zeros(codebook_size)
        self.initted = True
        self.beta, self.decay, self.kmeans_iters = beta, decay, kmeans_iters
        self.reduce = lambda tensor: tensor

    def _patch_tokens(self, vit, x):
        return vit.fc_norm(vit.forward_features(x)[:, vit.num_prefix_tokens:])

    def quantize(self, z: torch.Tensor, start: torch.Tensor | None = None) -> tuple:
        z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        if not self.initted:
            self.codebook, self.embed_cluster_size = kmeans_reference(flat.detach(), start, self.kmeans_iters)
            self.initted = True
        d = flat.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1) - 2 * flat @ self.codebook.t()
        ids = d.argmin(dim=1)
        codes = F.embedding(ids, self.codebook).view(z.shape)
        with torch.no_grad():
            one_hot = F.one_hot(ids, self.codebook.shape[0]).float()
            bins = self.reduce(one_hot.sum(0))
            self.cluster_size = self.cluster_size * self.decay + bins * (1 - self.decay)
            empty = bins == 0
            sums = self.reduce(flat.detach().t() @ one_hot)
            target = F.normalize((sums / bins.masked_fill(empty, 1.0)[None]).t(), dim=-1)
            target = torch.where(empty[:, None], self.codebook, target)
            self.codebook = F.normalize(self.codebook * self.decay + target * (1 - self.decay), dim=-1)
        loss = self.beta * F.mse_loss(codes.detach(), z)
        return z + (codes - z).detach(), loss, ids.view(z.shape[:-1])

    def step_loss(self, images: np.ndarray, target: np.ndarray, start: torch.Tensor | None = None) -> tuple:
        """(total loss, reconstruction loss, quantiser loss, ids) of one training forward."""
        x = torch.from_numpy(images) * 255.0 / 127.5 - 1.0
        z = self.encode_task_layer(self._patch_tokens(self.encoder, x))
        codes, quant_loss, ids = self.quantize(z, start)
        grid_map = codes.transpose(1, 2).reshape(codes.shape[0], -1, self.grid, self.grid)
        rec = self.decode_task_layer(self._patch_tokens(self.decoder, grid_map))
        t = torch.from_numpy(target)
        t = t / t.norm(dim=-1, keepdim=True)
        rec = rec / rec.norm(dim=-1, keepdim=True)
        rec_loss = (1 - (t * rec).sum(-1)).mean()
        return quant_loss + rec_loss, rec_loss, quant_loss, ids

    def unilm_state_dict(self) -> dict:
        """The trained parameters and the codebook under unilm's names (torch layout)."""
        state_dict = {**_unilm_vit_names(self.encoder, 'encoder.'), **_unilm_vit_names(self.decoder, 'decoder.')}
        for prefix, layers in (('encode_task_layer', self.encode_task_layer),
                               ('decode_task_layer', self.decode_task_layer)):
            for index in (0, 2):
                state_dict[f'{prefix}.{index}.weight'] = layers[index].weight.detach().clone()
                state_dict[f'{prefix}.{index}.bias'] = layers[index].bias.detach().clone()
        state_dict['quantize.embedding.weight'] = self.codebook.clone()
        return state_dict

    def unilm_grads(self) -> dict:
        """Each trained parameter's gradient under unilm's names (q/v bias gradients split off qkv's)."""
        grads = {}
        for prefix, module in (('encoder.', self.encoder), ('decoder.', self.decoder),
                               ('encode_task_layer.', self.encode_task_layer),
                               ('decode_task_layer.', self.decode_task_layer)):
            for name, param in module.named_parameters():
                if name.endswith('attn.qkv.bias'):
                    q_grad, _, v_grad = param.grad.view(3, -1)
                    stem = prefix + name[:-len('qkv.bias')]
                    grads[stem + 'q_bias'], grads[stem + 'v_bias'] = q_grad.clone(), v_grad.clone()
                else:
                    grads[prefix + name] = param.grad.clone()
        return grads
