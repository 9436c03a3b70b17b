"""Segmenting image files with a trained BEiT + UperNet, the logic of predict_segment.py: the dygraph segmentor or
its exported crop model (Paddle Inference) in the sliding loop of evaluation, and the maps written as palette PNGs.

Each image goes through task_segment's evaluation, the same code: SegmentationObjective.views resizes the decoded
image to each test scale (mmseg's keep-ratio resize of the original, SEG.IMG_SCALE times SEG.MS_RATIOS) and
normalises it; seg_inference.segment slides DATA.IMAGE_SIZE crops over it (SEG.TEST_MODE slide, SEG.SLIDE_STRIDE)
or feeds it whole, averages the softmax over the scales and SEG.FLIP's mirror at the original size and takes the
argmax. The model is the callable crops -> main logits that loop takes: the BeitUperNet itself, or
ExportedCropModel around export_model.py -segmentation's program.

A map is a palette ('P') PNG of the image's size whose pixel values are the class indices 0..SEG.NUM_CLASSES-1 (a
viewer shows the colours, a program reads the indices). With SEG.REDUCE_ZERO_LABEL (ADE20K) the indices are the
model's classes: ADE20K's annotation value is the index + 1 (its 0, "other", is never predicted). The palette is
PASCAL VOC's rule: bit 3j + c of the index k sets bit 7 - j of channel c (R, G, B), so class 0 is black, 1 dark red
(128, 0, 0), 2 green, 3 olive, 8 (64, 0, 0), and the 256 indices have 256 distinct colours.
"""
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import paddle
from PIL import Image

from config import ConfigError
from errors import BadInputError
from image_files import DECODE_ERRORS, image_size, load_rgb_image
from inference import CROPS_INPUT, ExportedPredictor, WeightsError, load_segmentor
from seg_inference import InferenceSettings, Model, segment, view_shapes
from task_segment import SegmentationObjective
from utils import use_all_cpu_cores

OVERLAY_SUFFIX = '_overlay'


def voc_palette() -> np.ndarray:
    """uint8 [256, 3]: the colour of each index by PASCAL VOC's bit rule (module doc)."""
    index = np.arange(256)
    colours = np.zeros((256, 3), np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return colours


PALETTE = voc_palette()


def map_image(classes: np.ndarray) -> Image.Image:
    """The class map [H, W] (values below 256) as a palette PNG image whose pixel values are the classes."""
    height, width = classes.shape
    image = Image.frombytes('P', (width, height), np.ascontiguousarray(classes, dtype=np.uint8).tobytes())
    image.putpalette(PALETTE.ravel().tolist())
    return image


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 RGB [H, W, 3]: (1 - alpha) x the image + alpha x its classes' colours, rounded half up."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * PALETTE[classes].astype(np.float32)
    return np.floor(blended + 0.5).astype(np.uint8)


def class_shares(classes: np.ndarray, names: Sequence[str]) -> list[dict]:
    """The classes present in a map, largest share of its pixels first (ties: lower index first)."""
    counts = np.bincount(classes.ravel(), minlength=len(names))
    order = np.argsort(-counts, kind='stable')
    return [{'index': int(k), 'name': names[k], 'share': float(counts[k] / classes.size)} for k in order if counts[k]]


class ExportedCropModel:
    """An exported segmentor's crop model in Paddle Inference as seg_inference's model callable: normalised crops
    [N, 3, S, S] -> the main logits [N, SEG.NUM_CLASSES, h, w] (paddle tensors on the host). Any other export (a
    classifier, block features) is refused by its input's name before anything runs. Run without oneDNN's placement
    pass, which cannot run the heads' bilinear_interp in Paddle 3.3.1 (inference.ONEDNN_PLACEMENT_PASS); fp32 only
    (bfloat16 is not offered without that pass)."""

    def __init__(self, prefix: str, num_threads: int | None = None):
        self.predictor = ExportedPredictor(prefix, num_threads=num_threads, onednn_placement=False)
        if self.predictor.input_name != CROPS_INPUT:
            raise WeightsError(f'{prefix} is not a segmentor\'s crop model (its input is '
                               f'{self.predictor.input_name!r}, not {CROPS_INPUT!r}): export the segmentor with '
                               'export_model.py -segmentation')

    def __call__(self, crops: paddle.Tensor) -> paddle.Tensor:
        [logits] = self.predictor.run(crops.numpy())
        return paddle.to_tensor(logits)


def crop_model(config, *, inference_model: str | None, use_ema: bool) -> tuple[Model, list]:
    """(the model callable the sliding loop runs, the notes of loading it): the export at ``inference_model``, or
    the dygraph segmentor with MODEL.PRETRAINED's weights (a checkpoint's EMA with ``use_ema``)."""
    if inference_model:
        return ExportedCropModel(inference_model), []
    use_all_cpu_cores()
    return load_segmentor(config, config.MODEL.PRETRAINED, use_ema)


def segment_image(model: Model, objective: SegmentationObjective, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: the class of each pixel of the uint8 RGB ``image`` [H, W, 3], as evaluation segments it."""
    classes = segment(model, objective.views(image), image.shape[:2], objective.settings)
    return classes.numpy()[0].astype(np.uint8)


def check_whole_mode(sizes: dict[str, tuple[int, int]], settings: InferenceSettings) -> None:
    """SEG.TEST_MODE whole feeds each test scale of an image to the model at once, which takes only its crop size:
    refuse images whose scales are not the crop (before any is segmented)."""
    if settings.mode != 'whole':
        return
    for path, (height, width) in sizes.items():
        other = [shape for shape in view_shapes(height, width, settings) if shape != settings.crop_size]
        if other:
            raise ConfigError(f'SEG.TEST_MODE whole: {path} ({height}x{width}) is resized to {other[0][0]}x'
                              f'{other[0][1]}, and the model takes {settings.crop_size[0]}x{settings.crop_size[1]} '
                              f'(DATA.IMAGE_SIZE) only: use SEG.TEST_MODE slide')


class OutputError(BadInputError):
    """Maps that would replace an input image, each other, or files already there."""


@dataclass(frozen=True)
class Outputs:
    """What one image writes: its map and, when asked, its overlay."""

    image: str
    map: str
    overlay: str | None

    def files(self) -> list[str]:
        return [self.map] + ([self.overlay] if self.overlay else [])


def plan_outputs(images: Sequence[str], folder: str, *, inputs: Sequence[str], with_overlay: bool,
                 overwrite: bool) -> list[Outputs]:
    """``folder``/<stem>.png (and <stem>_overlay.png) for each image, refused before anything is written when two
    images would write the same file, when a file would replace one of ``inputs`` (never allowed), or when it
    exists already and ``overwrite`` is off."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f'-output {folder} is a file, not a folder')
    planned = []
    writers = {}
    for path in images:
        stem = os.path.join(folder, os.path.splitext(os.path.basename(path))[0])
        outputs = Outputs(path, stem + '.png', stem + OVERLAY_SUFFIX + '.png' if with_overlay else None)
        for target in outputs.files():
            key = os.path.realpath(target)
            if key in writers:
                raise OutputError(f'{writers[key]} and {path} would both write {target}: rename one of them or '
                                  'segment them into different -output folders')
            writers[key] = path
            _check_target(target, inputs, overwrite)
        planned.append(outputs)
    return planned


def _check_target(target: str, inputs: Sequence[str], overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    replaced = next((path for path in inputs if os.path.exists(path) and os.path.samefile(path, target)), None)
    if replaced is not None:
        raise OutputError(f'{target} would replace the input image {replaced}: choose another -output folder '
                          '(input images are never replaced)')
    if os.path.isdir(target):
        raise OutputError(f'{target} is a folder: choose another -output folder')
    if not overwrite:
        raise OutputError(f'{target} exists: choose another -output folder, or -overwrite to replace the maps there')


def write_outputs(outputs: Outputs, image: np.ndarray, classes: np.ndarray, alpha: float) -> None:
    os.makedirs(os.path.dirname(outputs.map) or '.', exist_ok=True)
    map_image(classes).save(outputs.map)
    if outputs.overlay:
        Image.fromarray(overlay(image, classes, alpha)).save(outputs.overlay)


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3], decoded as the segmentation datasets decode their images."""
    return np.asarray(load_rgb_image(path))


def readable_images(paths: Sequence[str]) -> tuple[dict[str, tuple[int, int]], list[dict]]:
    """({path: (height, width)} of the images whose headers read, failures): one bad file must not stop the others.
    Only headers: each image is decoded once, when it is segmented (a corrupt body fails there)."""
    sizes, failures = {}, []
    for path in paths:
        try:
            sizes[path] = image_size(path)
        except DECODE_ERRORS as err:
            failures.append({'image': path, 'error': f'{type(err).__name__}: {err}'})
    return sizes, failures


def segment_file(outputs: Outputs, model: Model, objective: SegmentationObjective, *, alpha: float) -> dict:
    """Segment ``outputs.image``, write its map (and overlay), and return what it holds: the image, its size, the
    files written and the classes present with their share of the pixels."""
    image = read_image(outputs.image)
    classes = segment_image(model, objective, image)
    write_outputs(outputs, image, classes, alpha)
    return {'image': outputs.image, 'height': image.shape[0], 'width': image.shape[1], 'map': outputs.map,
            'overlay': outputs.overlay, 'classes': class_shares(classes, objective.names)}


def as_text(result: dict) -> str:
    files = ', '.join(path for path in (result['map'], result['overlay']) if path)
    lines = [f'{result["image"]} ({result["width"]}x{result["height"]}) -> {files}']
    lines += [f'  {entry["share"]:7.2%}  {entry["name"]} ({entry["index"]})' for entry in result['classes']]
    return '\n'.join(lines)
