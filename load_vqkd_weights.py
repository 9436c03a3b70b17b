"""Convert unilm's released VQ-KD tokenizers (BEiT v2) to the Paddle state dict build_vqkd_tokenizer loads.

    python load_vqkd_weights.py -src vqkd_encoder_base_decoder_3x768x12_clip.pth -dst vqkd_clip.pdparams [-check]

A released file holds, under ``model``, the encoder, the decoder, both task layers, the codebook with its EMA
statistics and, in some, the teacher's and the scaling layer's tensors. Inference needs the encoder,
``encode_task_layer`` and ``quantize.embedding.weight``: the rest is dropped (named on stdout), as unilm drops
``teacher*``, ``scaling*`` and ``loss*`` when it loads a tokenizer. The size (image, patch, width, depth, MLP
width, codebook) is read from the tensor shapes; the head count is not in the shapes (-num_heads, 12 for
unilm's ViT-B/16) and serves -check only, which compares the features with a timm-built reference of unilm's
tokenizer on random images and writes nothing above CHECK_TOLERANCE (the reference takes the same head count,
so a wrong one goes unnoticed: build_vqkd_tokenizer's num_heads must be the real one). Nothing is written
unless the whole file fits.
"""
import argparse
import math
import re
import sys

import numpy as np
import paddle

from torch_checkpoint import (
    CHECK_TOLERANCE,
    conversion_exit_code,
    partition_tensors,
    read_checkpoint,
    report_dropped,
    to_paddle_layout,
    write_converted,
)
from vqkd_tokenizer import VQKDTokenizer, VQKDWeightsError, check_state_dict_fits

KEPT_PREFIXES = ('encoder.', 'encode_task_layer.', 'quantize.embedding.weight')
# What inference does not need, by what it is (the first matching prefix names a tensor's group).
DROPPED_GROUPS = (
    ('decoder.', 'the decoder (tokenizer training)'),
    ('decode_task_layer.', 'the decoder\'s task layer (tokenizer training)'),
    ('quantize.', 'the codebook\'s EMA statistics'),
    ('teacher', 'the teacher'),
    ('scaling', 'the teacher\'s input scaling'),
    ('loss', 'the loss'),
)
_BLOCK_NAME = re.compile(r'encoder\.blocks\.(\d+)\.')
_REQUIRED = ('encoder.patch_embed.proj.weight', 'encoder.pos_embed', 'encoder.blocks.0.mlp.fc1.weight',
             'encode_task_layer.2.weight', 'quantize.embedding.weight')
CHECK_IMAGES = 2  # random images of -check


def split_state_dict(tensors: dict, source: str) -> tuple[dict, dict]:
    """(the tensors inference needs, group description -> names dropped); a file that is not a VQ-KD tokenizer,
    or holds tensors of no known group, is refused."""
    absent = [name for name in _REQUIRED if name not in tensors]
    if absent:
        raise VQKDWeightsError(f'{source}: not a VQ-KD tokenizer of unilm\'s beit2 (no {", ".join(absent)} among '
                               f'its {len(tensors)} tensors, e.g. {", ".join(list(tensors)[:3])})')
    kept, dropped, unknown = partition_tensors(tensors, kept_prefixes=KEPT_PREFIXES, dropped_groups=DROPPED_GROUPS)
    if unknown:
        raise VQKDWeightsError(f'{source}: {len(unknown)} tensors of no part of a VQ-KD tokenizer: {unknown[:3]}')
    return kept, dropped


def tokenizer_kwargs_from_state_dict(state_dict: dict, source: str, num_heads: int) -> dict:
    """The VQKDTokenizer arguments the tensor shapes describe (``num_heads`` given: shapes do not tell it)."""
    embed_dim, in_chans, patch_size, _ = state_dict['encoder.patch_embed.proj.weight'].shape
    num_patches = state_dict['encoder.pos_embed'].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise VQKDWeightsError(f'{source}: encoder.pos_embed holds {num_patches} patches, not a square grid')
    if embed_dim % num_heads:
        raise VQKDWeightsError(f'{source}: width {embed_dim} is not divisible by -num_heads {num_heads}')
    codebook_size, codebook_dim = state_dict['quantize.embedding.weight'].shape
    return {'img_size': int(grid * patch_size), 'patch_size': int(patch_size), 'in_chans': int(in_chans),
            'embed_dim': int(embed_dim), 'depth': len({m.group(1) for n in state_dict if (m := _BLOCK_NAME.match(n))}),
            'num_heads': num_heads,
            'mlp_ratio': state_dict['encoder.blocks.0.mlp.fc1.weight'].shape[0] / embed_dim,
            'codebook_size': int(codebook_size), 'codebook_dim': int(codebook_dim)}


def timm_reference_features(torch_state_dict: dict, kwargs: dict, images: np.ndarray) -> np.ndarray:
    """unilm's tokenizer features for ``images`` in [0, 1]: timm's Beit as the encoder (absolute position
    embedding, fc_norm on the patch tokens), plain torch for the rest, unilm's input mapping."""
    import torch
    from timm.models.beit import Beit

    encoder = Beit(img_size=kwargs['img_size'], patch_size=kwargs['patch_size'], in_chans=kwargs['in_chans'],
                   num_classes=0, global_pool='avg', embed_dim=kwargs['embed_dim'], depth=kwargs['depth'],
                   num_heads=kwargs['num_heads'], mlp_ratio=kwargs['mlp_ratio'], qkv_bias=True, init_values=None,
                   use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False).eval()
    tensors = {name: torch.from_numpy(value) for name, value in torch_state_dict.items()}
    encoder.load_state_dict({name[len('encoder.'):]: value for name, value in tensors.items()
                             if name.startswith('encoder.')})
    with torch.no_grad():
        x = torch.from_numpy(images) * 255.0 / 127.5 - 1.0
        patch_tokens = encoder.fc_norm(encoder.forward_features(x)[:, 1:])
        hidden = torch.tanh(torch.nn.functional.linear(patch_tokens, tensors['encode_task_layer.0.weight'],
                                                       tensors['encode_task_layer.0.bias']))
        features = torch.nn.functional.linear(hidden, tensors['encode_task_layer.2.weight'],
                                              tensors['encode_task_layer.2.bias'])
        return torch.nn.functional.normalize(features, dim=-1).numpy()


def check_difference(model: VQKDTokenizer, torch_state_dict: dict, kwargs: dict) -> float:
    """Max abs difference of the normalised features of ``model`` (converted weights loaded) to the reference."""
    size = kwargs['img_size']
    images = np.random.default_rng(0).random((CHECK_IMAGES, kwargs['in_chans'], size, size), dtype=np.float32)
    expected = timm_reference_features(torch_state_dict, kwargs, images)
    with paddle.no_grad():
        actual = model.eval().features(paddle.to_tensor(images)).numpy()
    return float(np.abs(actual - expected).max())


def convert_file(src: str, dst: str, check: bool = False, num_heads: int = 12, trust_pickle: bool = False) -> dict:
    """Write the tokenizer in ``src`` to ``dst`` atomically (after -check, if asked); returns its arguments."""
    kept, dropped = split_state_dict(read_checkpoint(src, trust_pickle), src)
    kwargs = tokenizer_kwargs_from_state_dict(kept, src, num_heads)
    try:
        model = VQKDTokenizer(**kwargs)
    except ValueError as err:
        raise VQKDWeightsError(f'{src}: not a VQ-KD tokenizer ({err})') from None
    state_dict = to_paddle_layout(kept, model)
    check_state_dict_fits(state_dict, model, src)
    print(f'VQ-KD tokenizer: {", ".join(f"{key}={value:g}" for key, value in kwargs.items())}')
    report_dropped(dropped)
    difference = None
    if check:
        model.set_state_dict(state_dict)
        difference = check_difference(model, kept, kwargs)
    write_converted(state_dict, dst, difference=difference, reference='timm-built unilm VQ-KD',
                    outputs='normalised feature')
    return kwargs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert a VQ-KD tokenizer of unilm\'s beit2 (vqkd_*.pth) to Paddle')
    parser.add_argument('-src', required=True, help='vqkd_encoder_base_decoder_*.pth (or .safetensors)')
    parser.add_argument('-dst', required=True, help='output .pdparams')
    parser.add_argument('-check', action='store_true',
                        help=f'compare features with a timm-built reference (needs torch, timm); nothing is '
                             f'written above {CHECK_TOLERANCE:g}')
    parser.add_argument('-num_heads', type=int, default=12, help='attention heads of the encoder (for -check)')
    parser.add_argument('-trust_pickle', action='store_true', help='read a .pth with torch\'s full unpickler')
    args = parser.parse_args(argv)
    return conversion_exit_code(convert_file, args.src, args.dst, args.check, args.num_heads, args.trust_pickle)


if __name__ == '__main__':
    sys.exit(main())
