"""Convert official BEiT PyTorch checkpoints to a Paddle state dict (.pdparams).

    python load_pytorch_weights.py -cfg configs/beit_base_patch16_224.yaml \
        -src beit_base_patch16_224_pt22k_ft22kto1k.pth -dst beit_base_patch16_224.pdparams [-check]

Reads unilm ``.pth`` files (a dict holding ``model``, ``module`` or a bare state dict), timm ``.pth`` /
``.bin`` files (both need PyTorch) and ``.safetensors`` files (read here, no PyTorch needed). The output is
written only when the whole checkpoint fits the config. BEiT v2's fine-tuned files (unilm ``beit2/``, timm
``beitv2_*``) have v1's tensor names and convert alike, with their own configs (configs/beitv2_*.yaml: the
ImageNet mean/std).
"""
import argparse
import sys

import numpy as np
import paddle
import paddle.nn as nn

from beit import adapt_state_dict, build_beit
from beit_pretrain import build_beit_pretrain
from config import get_config, merge_opts, validate_config
from torch_checkpoint import (
    conversion_exit_code,
    read_checkpoint,
    timm_kwargs_from_config,
    to_paddle_layout,
    write_converted,
)


def convert_state_dict(torch_state_dict: dict, model: nn.Layer, rel_pos_interp: str = 'cubic'):
    """PyTorch-layout tensors -> (state dict that fits ``model``, notes)."""
    return adapt_state_dict(to_paddle_layout(torch_state_dict, model), model, rel_pos_interp)


def compare_with_timm(config, torch_state_dict: dict, model: nn.Layer, batch_size: int = 2, mim: bool = False) -> float:
    """Max abs difference of the logits (``mim``: of the encoder tokens) between ``model`` and timm's Beit loading
    the same checkpoint."""
    import torch
    from timm.models.beit import Beit, checkpoint_filter_fn
    reference = Beit(**timm_kwargs_from_config(config, mim)).eval()
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in torch_state_dict.items()}
    reference.load_state_dict(checkpoint_filter_fn(tensors, reference), strict=False)
    size = config.DATA.IMAGE_SIZE
    images = np.random.default_rng(0).standard_normal((batch_size, config.DATA.IMAGE_CHANNELS, size, size))
    images = images.astype(np.float32)
    with torch.no_grad():  # the pre-training model is compared with no patch masked
        inputs = torch.from_numpy(images)
        expected = (reference.forward_features(inputs) if mim else reference(inputs)).numpy()
    model.eval()
    with paddle.no_grad():
        actual = (model.forward_tokens if mim else model)(paddle.to_tensor(images)).numpy()
    return float(np.abs(actual - expected).max())


def convert_file(cfg_file: str, src: str, dst: str, opts=(), check: bool = False, trust_pickle: bool = False,
                 mim: bool = False):
    """Convert ``src`` for the fine-tuning model of ``cfg_file``, or with ``mim`` for its pre-training model (which
    keeps mask_token, lm_head, the final norm and the shared relative position bias)."""
    config = get_config(cfg_file)
    merge_opts(config, list(opts))
    validate_config(config)
    model = (build_beit_pretrain if mim else build_beit)(config)
    torch_state_dict = read_checkpoint(src, trust_pickle)
    state_dict, notes = convert_state_dict(torch_state_dict, model, config.MODEL.REL_POS_INTERP)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state_dict.items()})
    for note in notes:
        print(f'note: {note}')
    difference = compare_with_timm(config, torch_state_dict, model, mim=mim) if check else None
    write_converted(state_dict, dst, difference=difference, reference='timm', outputs='token' if mim else 'logit')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert a BEiT PyTorch checkpoint to Paddle')
    parser.add_argument('-cfg', required=True, help='YAML config of the target model')
    parser.add_argument('-src', required=True, help='.pth, .bin or .safetensors checkpoint')
    parser.add_argument('-dst', required=True, help='output .pdparams')
    parser.add_argument('-check', action='store_true', help='compare outputs with timm (needs torch, timm)')
    parser.add_argument('-trust_pickle', action='store_true', help='allow arbitrary objects in a .pth file')
    parser.add_argument('-mim', action='store_true',
                        help='convert for the pre-training (masked image modeling) model of the config: keeps '
                             'mask_token, lm_head, norm and the shared relative position bias')
    parser.add_argument('-opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    args = parser.parse_args(argv)
    return conversion_exit_code(convert_file, args.cfg, args.src, args.dst, args.opts, args.check, args.trust_pickle,
                                args.mim)


if __name__ == '__main__':
    sys.exit(main())
