"""Export a trained BEiT for Paddle Inference, with a dynamic batch size.

    python export_model.py -cfg configs/beit_base_patch16_224.yaml -pretrained beit_base_patch16_224.pdparams \
        -output exported/beit_base_patch16_224 [-ema]
    python predict.py -inference_model exported/beit_base_patch16_224 [-precision bf16] dog.jpg

Writes PREFIX.json + PREFIX.pdiparams (the network as a PIR program and its weights; ``paddle.inference.Config``
reads them) and PREFIX.yaml (the config). The program takes normalised [B, 3, S, S] batches: the eval
preprocessing stays in Python, where predict.py applies the same transform to the exported and the dygraph
model, as the config in PREFIX.yaml describes. Exit codes: 0 exported; 2 bad arguments, config or weights.
"""
import sys

from cli import build_arg_parser, update_config
from config import ConfigError, get_default_config
from inference import WeightsError, export, load_model


def main(argv=None) -> int:
    parser = build_arg_parser('Export a BEiT for Paddle Inference')
    parser.add_argument('-ema', action='store_true', help="a training checkpoint's EMA weights instead of its model")
    args = parser.parse_args(argv)
    if not args.pretrained or not args.output:
        parser.error('-pretrained WEIGHTS and -output PREFIX are required')
    try:
        config = update_config(get_default_config(), args)
        model, notes = load_model(config, config.MODEL.PRETRAINED, args.ema)
        export(model, config, args.output)
    except (ConfigError, WeightsError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for note in notes:
        print(f'note: {note}')
    print(f'exported {config.MODEL.NAME} ({config.DATA.IMAGE_SIZE} px, any batch size) to '
          f'{args.output}.json, .pdiparams and .yaml')
    return 0


if __name__ == '__main__':
    sys.exit(main())
