"""Export a trained BEiT for Paddle Inference, with a dynamic batch size.

    python export_model.py -cfg configs/beit_base_patch16_224.yaml -pretrained beit_base_patch16_224.pdparams \
        -output exported/beit_base_patch16_224 [-ema] [-block_features 3 5 7 11]
    python predict.py -inference_model exported/beit_base_patch16_224 [-precision bf16] dog.jpg
    python export_model.py -segmentation -cfg configs/upernet_beit_base_640_ade20k.yaml -pretrained upernet.pdparams \
        -output exported/upernet_beit_base_640 [-ema]
    python predict_segment.py -inference_model exported/upernet_beit_base_640 -output maps room.jpg

Writes PREFIX.json + PREFIX.pdiparams (the network as a PIR program and its weights; ``paddle.inference.Config``
reads them) and PREFIX.yaml (the config). The program takes normalised [B, 3, S, S] batches: the eval
preprocessing stays in Python, where predict.py applies the same transform to the exported and the dygraph
model, as the config in PREFIX.yaml describes. With -block_features the program is a backbone for dense tasks
instead of the classifier: one output per chosen block (negative indices count from the end), its map
[B, D, S/p, S/p] without the final norm (inference.ExportedPredictor.run returns them).
With -segmentation the config is a segmentor's (main_segment.py: BEiT + UperNet, the SEG keys) and the program is
its crop model in eval mode: normalised crops [B, 3, S, S] (S = DATA.IMAGE_SIZE, the crop; the input is named
'crops', which tells predict.py and predict_segment.py each other's exports apart) to the main head's
logits [B, SEG.NUM_CLASSES, 4S/p, 4S/p], as the model gives them: the model callable seg_inference slides over an
image, which resizes them to the window itself (float32), for the exported and the dygraph model alike. The sliding
windows, scales and flips stay outside (predict_segment.py), as PREFIX.yaml's SEG keys describe them.
The model is built and traced on the CPU whatever the machine has: PIR's ``full`` ops record the place they were
traced on, so a program traced on a GPU might not load in the CPU predictor.
Exit codes: 0 exported; 2 bad arguments, config or weights.
"""
import contextlib
import sys

import paddle

from beit import resolve_block_indices
from cli import build_arg_parser, update_config
from config import get_default_config
from errors import EXIT_BAD_INPUT, BadInputError
from inference import CROPS_INPUT, IMAGE_INPUT, BlockFeatures, export, load_model, load_segmentor
from seg_inference import settings_from_config


def main(argv=None) -> int:
    parser = build_arg_parser('Export a BEiT for Paddle Inference')
    parser.add_argument('-ema', action='store_true', help="a training checkpoint's EMA weights instead of its model")
    parser.add_argument('-block_features', type=int, nargs='+', metavar='INDEX',
                        help='export the feature maps of these blocks instead of the logits (e.g. 3 5 7 11)')
    parser.add_argument('-segmentation', action='store_true',
                        help="the config and weights are a segmentor's (main_segment.py): export its crop model")
    args = parser.parse_args(argv)
    if not args.pretrained or not args.output:
        parser.error('-pretrained WEIGHTS and -output PREFIX are required')
    if args.segmentation and args.block_features:
        parser.error('-block_features exports a classifier\'s backbone: drop it with -segmentation')
    try:
        config = update_config(get_default_config(), args)
        if args.block_features:
            check_block_indices(parser, config, args.block_features)
        with on_cpu():
            model, notes = exported_model(config, args)
            export(model, config, args.output, input_name=CROPS_INPUT if args.segmentation else IMAGE_INPUT)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in notes:
        print(f'note: {note}')
    what = (f'the maps of blocks {args.block_features} of ' if args.block_features
            else 'the crop model of ' if args.segmentation else '')
    print(f'exported {what}{config.MODEL.NAME} ({config.DATA.IMAGE_SIZE} px, any batch size) to '
          f'{args.output}.json, .pdiparams and .yaml')
    return 0


def exported_model(config, args) -> tuple[paddle.nn.Layer, list]:
    """(the layer to trace, the notes of loading its weights): a segmentor whose inference settings predict_segment.py
    can use, a classifier, or its block features."""
    if args.segmentation:
        settings_from_config(config)
        return load_segmentor(config, config.MODEL.PRETRAINED, args.ema)
    model, notes = load_model(config, config.MODEL.PRETRAINED, args.ema)
    return (BlockFeatures(model, args.block_features) if args.block_features else model), notes


@contextlib.contextmanager
def on_cpu():
    """Paddle's device set to the CPU inside, restored after."""
    previous = paddle.get_device()
    paddle.set_device('cpu')
    try:
        yield
    finally:
        paddle.set_device(previous)


def check_block_indices(parser, config, indices: list[int]) -> None:
    """Refuse blocks the model does not have before any weights are read (exit 2, as any bad argument)."""
    try:
        resolve_block_indices(config.MODEL.DEPTH, indices)
    except ValueError as err:
        parser.error(f'-block_features: {err}')


if __name__ == '__main__':
    sys.exit(main())
