"""Convert a BEiT segmentation checkpoint (unilm's mmseg file, or transformers' BeitForSemanticSegmentation file) to
the Paddle state dict of the config's segmentor (.pdparams).

    python load_seg_weights.py -cfg CONFIG.yaml -src upernet_beit_base_12_640_slide_160k_ade20k.pth \
        -dst upernet_beit_base_640.pdparams [-check]

-check runs transformers' BeitForSemanticSegmentation (needs torch and transformers) on the same weights, pointed at
unilm's blocks, and writes nothing unless main and auxiliary logits agree within 1e-4. The output is written only
when every tensor of the model came from the file; a file of another kind is refused (exit 2).
"""
import argparse
import sys

import numpy as np
import paddle

from beit_seg import build_beit_upernet
from config import get_config, merge_opts, validate_config
from seg_checkpoints import convert_state_dict, transformers_logits, transformers_model, unilm_to_transformers
from torch_checkpoint import ConversionError, conversion_exit_code, read_checkpoint, write_converted


def compare_with_transformers(config, model, state_dict: dict, source_state_dict: dict, layout: str) -> float:
    """Max abs difference of the main and auxiliary logits between ``model`` (holding ``state_dict``) and
    transformers' model: loading the file itself when it is in transformers' layout, else our weights laid out as
    transformers' file."""
    hf_state_dict = source_state_dict if layout == 'transformers' else unilm_to_transformers(state_dict, model)
    reference = transformers_model(config, hf_state_dict)
    size = config.DATA.IMAGE_SIZE
    images = np.random.default_rng(0).standard_normal((1, config.DATA.IMAGE_CHANNELS, size, size)).astype('float32')
    expected = transformers_logits(reference, images)
    model.eval()
    with paddle.no_grad():
        actual = [logits.numpy() for logits in model.forward_heads(paddle.to_tensor(images))]
    return max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))


def convert_file(cfg_file: str, src: str, dst: str, opts=(), check: bool = False, trust_pickle: bool = False):
    config = get_config(cfg_file)
    merge_opts(config, list(opts))
    validate_config(config)
    model = build_beit_upernet(config)
    source = read_checkpoint(src, trust_pickle)
    state_dict, notes, layout = convert_state_dict(source, model, src, config.MODEL.REL_POS_INTERP)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state_dict.items()})
    print(f'read {src} as {layout}\'s layout')
    for note in notes:
        print(f'note: {note}')
    difference = None
    if check:
        if any('resampled' in note for note in notes):
            raise ConversionError(f'-check compares at the checkpoint\'s own crop; {src} was resampled to '
                                  f'DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE}: {dst} not written')
        difference = compare_with_transformers(config, model, state_dict, source, layout)
    write_converted(state_dict, dst, difference=difference, reference='transformers')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert a BEiT segmentation checkpoint (unilm or transformers) to Paddle')
    parser.add_argument('-cfg', required=True, help='YAML config of the segmentor')
    parser.add_argument('-src', required=True, help='.pth, .bin or .safetensors checkpoint')
    parser.add_argument('-dst', required=True, help='output .pdparams')
    parser.add_argument('-check', action='store_true',
                        help='compare the logits with transformers\' BeitForSemanticSegmentation (needs torch, '
                             'transformers)')
    parser.add_argument('-trust_pickle', action='store_true', help='allow arbitrary objects in a .pth file')
    parser.add_argument('-opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    args = parser.parse_args(argv)
    return conversion_exit_code(convert_file, args.cfg, args.src, args.dst, args.opts, args.check, args.trust_pickle)


if __name__ == '__main__':
    sys.exit(main())
