"""Segmentation maps of image files with a trained BEiT + UperNet, in dygraph or through an exported crop model.

    python predict_segment.py -cfg configs/beit_tiny_seg_fashion.yaml -pretrained output/checkpoint-best.pdparams \
        -output maps [-ema] [-overlay [-alpha 0.5]] data/fashion_seg/images/validation/00000.jpg
    python export_model.py -segmentation -cfg configs/beit_tiny_seg_fashion.yaml \
        -pretrained output/checkpoint-best.pdparams -output exported/fashion_seg
    python predict_segment.py -inference_model exported/fashion_seg -output maps [-overlay] IMAGE ...

Writes for each image ``-output``/<stem>.png, a palette PNG of the image's size whose pixel values are the class
indices (PASCAL VOC's colours; with SEG.REDUCE_ZERO_LABEL, ADE20K's annotation value is the index + 1), and with
-overlay <stem>_overlay.png, the image blended with the map's colours (-alpha: the colours' weight). Prints the
classes present in each map with their share of its pixels (-json: as JSON), named as the segmentation task names
them (DATA_PATH/classes.txt, or ADE20K's 150). Details: seg_predict.py.

Every image is segmented as main_segment.py evaluates: resized to the test scale(s), DATA.IMAGE_SIZE crops slid
over it (or the whole image), SEG.MS_RATIOS and SEG.FLIP averaged, at its original size. ``-pretrained`` takes a
segmentor's .pdparams or a main_segment.py checkpoint (``-ema`` for its EMA weights) with the config it was
trained with; ``-inference_model PREFIX`` takes export_model.py -segmentation's output and reads its config from
PREFIX.yaml (a ``-cfg`` or -opts given too must agree on everything that changes the map:
inference.SEG_EXPORT_CONTRACT_KEYS; re-export to change them). fp32 only.

A script of its own rather than a mode of predict.py: it writes files rather than printing top-k classes, takes
other flags (-output, -overlay, -alpha, -overwrite) and another model, and shares predict.py's modules (inference,
image_files) rather than its code.

Maps never replace an input image; two images of one stem, or files already in -output (unless -overwrite), are
refused before anything is written. Exit codes: 0 when at least one image was segmented (unreadable images are
named on stderr and skipped); 1 when none could be; 2 for bad arguments, config, weights, exported model or
outputs (nothing written).
"""
import json
import sys

from cli import add_predictor_flags, build_arg_parser, check_predictor_flags, update_config
from config import get_default_config
from engine import World
from errors import EXIT_BAD_INPUT, BadInputError
from image_files import DECODE_ERRORS
from inference import SEG_EXPORT_CONTRACT_KEYS, check_export_contract, exported_config
from seg_datasets import validate_seg_data_config
from seg_predict import as_text, check_whole_mode, crop_model, plan_outputs, readable_images, segment_file
from task_segment import build_segmentation_objective


def parse_args(argv):
    parser = build_arg_parser('Segment images with a BEiT + UperNet')
    add_predictor_flags(parser, 'run export_model.py -segmentation output')
    parser.add_argument('-overlay', action='store_true', help='also write <stem>_overlay.png')
    parser.add_argument('-alpha', type=float, default=None, help="the map colours' weight in the overlay (0.5)")
    parser.add_argument('-overwrite', action='store_true', help='replace maps already in -output')
    args = parser.parse_args(argv)
    check_predictor_flags(parser, args)
    if not args.output:
        parser.error('-output FOLDER is required (the maps are written there)')
    if args.alpha is not None and not args.overlay:
        parser.error('-alpha weighs the overlay: add -overlay')
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        parser.error(f'-alpha must lie in [0, 1], got {args.alpha}')
    args.alpha = 0.5 if args.alpha is None else args.alpha
    return args


def read_config(args):
    """-cfg and flags; for an exported model its own config is the base, and any other must agree with it."""
    use_exported = args.inference_model and not args.cfg
    config = update_config(exported_config(args.inference_model) if use_exported else get_default_config(), args)
    if args.inference_model:
        check_export_contract(config, args.inference_model, SEG_EXPORT_CONTRACT_KEYS)
    validate_seg_data_config(config)
    return config


def report_failure(failure: dict) -> dict:
    print(f'error: cannot read {failure["image"]}: {failure["error"]}', file=sys.stderr)
    return failure


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = read_config(args)
        model, notes = crop_model(config, inference_model=args.inference_model, use_ema=args.ema)
        objective = build_segmentation_objective(config, World())
        sizes, failures = readable_images(args.images)
        check_whole_mode(sizes, objective.settings)
        planned = plan_outputs(list(sizes), args.output, inputs=args.images, with_overlay=args.overlay,
                               overwrite=args.overwrite)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    for failure in failures:
        report_failure(failure)
    results = []
    for outputs in planned:
        try:
            results.append(segment_file(outputs, model, objective, alpha=args.alpha))
        except DECODE_ERRORS as err:  # a body that does not decode, or a file changed since its header was read
            failures.append(report_failure({'image': outputs.image, 'error': f'{type(err).__name__}: {err}'}))
            continue
        if not args.json:
            print(as_text(results[-1]), flush=True)
    if args.json:
        print(json.dumps({'segmented': results, 'errors': failures}, indent=2))
    return 0 if results else 1


if __name__ == '__main__':
    sys.exit(main())
