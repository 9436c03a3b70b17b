"""A picture of a trained segmentor's predictions next to the ground truth, for the first validation images.

    python plot_segmentation.py -cfg configs/beit_tiny_seg_fashion.yaml \
        -pretrained output/seg-demo/checkpoint-best.pdparams -output output/seg-demo [-ema] [-num_images 8]

Writes -output/predictions.png (replacing the one there: it is derived from the run): a row per image of the
config's validation split, in the order evaluation reads them, with the image, its ground truth and the prediction
coloured by class (PASCAL VOC's palette; ignored pixels in (224, 224, 192)), each row's pixel accuracy under it and
a legend of the classes shown (named by DATA_PATH/classes.txt when the data has one). Every image is segmented as
main_segment.py evaluates it (seg_figure.py says how). ``-pretrained`` takes a segmentor's .pdparams or a
main_segment.py checkpoint (``-ema`` for its EMA weights) with the config it was trained with (and its -opts).

Exit codes: 0 written; 2 for bad arguments, config, data or weights (the message names the file; nothing written).
"""
import os
import sys

from cli import build_arg_parser, update_config
from config import get_default_config
from engine import World
from errors import EXIT_BAD_INPUT, BadInputError
from seg_datasets import validate_seg_data_config
from seg_figure import FILE_NAME, draw, predicted_rows
from seg_predict import OutputError, crop_model
from task_segment import build_segmentation_objective, get_seg_val_set

DEFAULT_IMAGES = 8


def parse_args(argv):
    parser = build_arg_parser('Plot a segmentor\'s predictions next to the ground truth')
    parser.add_argument('-ema', action='store_true', help="a training checkpoint's EMA weights instead of its model")
    parser.add_argument('-num_images', type=int, default=DEFAULT_IMAGES,
                        help=f'the first N validation images, one row each ({DEFAULT_IMAGES})')
    args = parser.parse_args(argv)
    if not args.pretrained:
        parser.error('-pretrained WEIGHTS is required (a segmentor\'s .pdparams or a main_segment.py checkpoint)')
    if not args.output:
        parser.error(f'-output FOLDER is required ({FILE_NAME} is written there)')
    if args.num_images < 1:
        parser.error(f'-num_images must be at least 1, got {args.num_images}')
    return args


def check_output(folder: str) -> str:
    """The picture's path in ``folder``, refused when the folder or the picture's name is something else."""
    path = os.path.join(folder, FILE_NAME)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f'-output {folder} is a file, not a folder')
    if os.path.isdir(path):
        raise OutputError(f'{path} is a folder: choose another -output folder')
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = check_output(args.output)
        config = update_config(get_default_config(), args)
        validate_seg_data_config(config)
        model, notes = crop_model(config, inference_model=None, use_ema=args.ema)
        objective = build_segmentation_objective(config, World())
        rows = predicted_rows(model, objective, get_seg_val_set(config), args.num_images)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    draw(rows, objective.names, objective.ignore_index, path)
    print(f'wrote {path} ({len(rows)} validation images)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
