"""Top-k classes of image files with a trained BEiT, in dygraph or through an exported Paddle Inference model.

    python predict.py -cfg configs/beit_base_patch16_224.yaml -pretrained beit_base_patch16_224.pdparams dog.jpg
    python predict.py -inference_model exported/beit [-precision bf16] dog.jpg cat.png [-json] [-topk 5]

Every image goes through the config's eval transform (short side to IMAGE_SIZE / CROP_PCT, center crop,
normalise), whichever predictor runs. ``-pretrained`` takes a converted .pdparams or a training checkpoint
(``-ema`` for its EMA weights); ``-inference_model PREFIX`` takes export_model.py's output and reads its config
from PREFIX.yaml (a ``-cfg`` given too must agree on size and preprocessing).

Class names: ``-class_names FILE`` (one name per line, line k for class k), else DATA_PATH/classes.txt, else the
ImageNet-1k names shipped in data/imagenet_classes.txt when MODEL.NUM_CLASSES is 1000, else class indices.

Exit codes: 0 when at least one image was predicted (unreadable images are named on stderr and skipped);
1 when none could be; 2 for bad arguments, config, weights, exported model or class-names file.
"""
import json
import os
import sys

import numpy as np

from cli import add_predictor_flags, build_arg_parser, check_predictor_flags, update_config
from config import get_default_config
from errors import EXIT_BAD_INPUT, BadInputError
from image_files import DECODE_ERRORS, load_rgb_image
from inference import (
    PRECISIONS,
    DygraphPredictor,
    ExportedPredictor,
    WeightsError,
    check_export_contract,
    exported_config,
    load_model,
)
from transforms import get_val_transforms, host_normalise

IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'imagenet_classes.txt')
IMAGENET_NUM_CLASSES = 1000


class ClassNamesError(BadInputError):
    """A class-names file that cannot name this model's classes."""


def parse_args(argv):
    parser = build_arg_parser('Predict the classes of images with a BEiT')
    add_predictor_flags(parser, 'run export_model.py output')
    parser.add_argument('-precision', choices=PRECISIONS, default='fp32', help='for -inference_model; bf16 needs '
                        'a CPU with bfloat16 support')
    parser.add_argument('-topk', type=int, default=5)
    parser.add_argument('-class_names', default=None, metavar='FILE', help='one class name per line')
    args = parser.parse_args(argv)
    check_predictor_flags(parser, args)
    if not args.inference_model and args.precision != 'fp32':
        parser.error('-precision bf16 needs -inference_model (Paddle has no bfloat16 CPU kernels in dygraph)')
    if args.topk < 1:
        parser.error('-topk must be at least 1')
    return args


def read_config(args):
    """-cfg and flags; for an exported model its own config is the base, and any other must agree with it."""
    use_exported = args.inference_model and not args.cfg
    config = update_config(exported_config(args.inference_model) if use_exported else get_default_config(), args)
    if args.inference_model:
        check_export_contract(config, args.inference_model)
    return config


def read_class_names(path: str, num_classes: int) -> list[str]:
    with open(path, encoding='utf-8-sig') as f:
        names = [line.strip() for line in f.read().splitlines()]
    if len(names) != num_classes or not all(names):
        raise ClassNamesError(f'{path}: {len(names)} lines ({names.count("")} empty), expected {num_classes} '
                              'non-empty class names (MODEL.NUM_CLASSES)')
    return names


def class_names_for(config, class_names_file: str | None) -> list[str]:
    """The most specific names available: the user's file, the dataset's, ImageNet's, or the indices."""
    num_classes = config.MODEL.NUM_CLASSES
    if class_names_file:
        if not os.path.isfile(class_names_file):
            raise ClassNamesError(f'class names file not found: {class_names_file}')
        return read_class_names(class_names_file, num_classes)
    dataset_names = os.path.join(config.DATA.DATA_PATH, 'classes.txt')
    if config.DATA.DATA_PATH and os.path.isfile(dataset_names):
        return read_class_names(dataset_names, num_classes)
    if num_classes == IMAGENET_NUM_CLASSES:
        return read_class_names(IMAGENET_CLASSES, num_classes)
    return [str(index) for index in range(num_classes)]


def build_predictor(config, args):
    if args.inference_model:
        return ExportedPredictor(args.inference_model, args.precision)
    model, notes = load_model(config, config.MODEL.PRETRAINED, args.ema)
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    return DygraphPredictor(model)


def prepare_images(paths: list[str], transform) -> tuple[list[str], list[np.ndarray], list[dict]]:
    """(readable paths, their input arrays, failures); one bad file must not stop the others."""
    good_paths, arrays, failures = [], [], []
    for path in paths:
        try:
            arrays.append(transform(load_rgb_image(path)))
        except DECODE_ERRORS as err:
            failures.append({'image': path, 'error': f'{type(err).__name__}: {err}'})
            continue
        good_paths.append(path)
    return good_paths, arrays, failures


def predict_logits(predictor, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
    return np.concatenate([predictor(np.stack(arrays[start:start + batch_size]))
                           for start in range(0, len(arrays), batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_k(paths: list[str], logits: np.ndarray, names: list[str], k: int) -> list[dict]:
    """Per image the k most likely classes, most likely first (ties: lower index first)."""
    probabilities = softmax(logits.astype(np.float64))
    results = []
    for path, row, probs in zip(paths, logits, probabilities):
        order = np.argsort(-probs, kind='stable')[:k]
        results.append({'image': path, 'top': [
            {'index': int(i), 'name': names[i], 'probability': float(probs[i]), 'logit': float(row[i])}
            for i in order]})
    return results


def as_text(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines.append(result['image'])
        lines += [f'  {rank}. {entry["probability"]:7.2%}  {entry["name"]} ({entry["index"]})'
                  for rank, entry in enumerate(result['top'], 1)]
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = read_config(args)
        names = class_names_for(config, args.class_names)
        predictor = build_predictor(config, args)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    val_transform, normalise = get_val_transforms(config), host_normalise(config)
    paths, arrays, failures = prepare_images(args.images, lambda image: normalise(val_transform(image)))
    for failure in failures:
        print(f'error: cannot read {failure["image"]}: {failure["error"]}', file=sys.stderr)
    results = []
    if arrays:
        try:
            logits = predict_logits(predictor, arrays, config.DATA.BATCH_SIZE_EVAL)
        except WeightsError as err:  # an export of block features shows itself at its first run
            print(f'error: {err}', file=sys.stderr)
            return EXIT_BAD_INPUT
        results = top_k(paths, logits, names, min(args.topk, config.MODEL.NUM_CLASSES))
    if args.json:
        print(json.dumps({'predictions': results, 'errors': failures}, indent=2))
    elif results:
        print(as_text(results))
    return 0 if results else 1


if __name__ == '__main__':
    sys.exit(main())
