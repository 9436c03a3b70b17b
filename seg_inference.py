"""Segmentation inference as mmseg 0.11's EncoderDecoder runs unilm's ADE20K configs: sliding windows or the whole
image, the softmax at the original size, and multi-scale + flip test-time augmentation.

Facts carried over (mmseg/models/segmentors/encoder_decoder.py, mmseg/datasets/pipelines/test_time_aug.py, mmcv's
imrescale, unilm's mmcv_custom/resize_transform.py):
- slide: ``max(H - crop + stride - 1, 0) // stride + 1`` window rows (columns alike), row i starting at
  ``i * stride``, each window moved back to end at the image's bottom/right edge when it would pass it; the
  model's logits resized bilinearly (align_corners False) to the window, summed in place, divided by the number
  of windows that cover each pixel.
- whole: one forward, the logits resized to the image.
- both: the logits resized bilinearly to the original image, softmax over classes, a flipped view's output
  flipped back; multi-scale + flip averages these softmax outputs (not the logits) and takes the argmax.
- scales: MultiScaleFlipAug's ``(int(W * r), int(H * r))`` of img_scale (2560, 640) per ratio r, each once as it
  is and once mirrored when flipping. One scale (no ratios): mmseg's Resize rule (the image as large as fits in
  the scale's long and short side, keeping its ratio). unilm's ``_ms`` configs resize with SETR_Resize instead:
  the short side becomes max(crop, min(scale)) with no cap on the long side, so ratios 0.5 and 0.75 give the
  crop size as 1.0 does (SEG.SETR_MULTI_SCALE).

One deviation: mmseg feeds a window smaller than the crop (an image side under 640) to the model as it is; a BEiT
model takes only its crop size (its relative position tables are per patch grid; unilm's would fail the same
way), so such a window is padded bottom/right with 0 (the mean colour after normalisation, as training pads) to
the crop, and the window's part of the crop-sized logits is kept (``pad_to_crop``; False is mmseg's behaviour).
The model is any callable images [N, 3, h, w] -> logits [N, C, h', w'] (any h', w'); this module never builds
one (under AMP, pass ``lambda x: amp.forward(model, x)``: the resizes, sums and softmax here stay float32). The
images come from a ``view`` callable, (height, width) -> the normalised images resized to that size, so the data
pipeline's own resize (mmseg: bilinear on the uint8 image, then normalise) makes every scale."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from config import ConfigError, named_origin
from errors import BadInputError

TEST_MODES = ('slide', 'whole')
Model = Callable[[paddle.Tensor], paddle.Tensor]
# (height, width) -> the normalised image(s) resized to it, [N, 3, height, width]: the data pipeline's resize
View = Callable[[tuple[int, int]], paddle.Tensor | np.ndarray]


class SettingsError(BadInputError):
    """A refused inference setting; ``fields`` names the InferenceSettings fields it is about."""

    def __init__(self, fields: tuple[str, ...], message: str):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class InferenceSettings:
    """How to segment: mmseg's test_cfg (mode, crop_size, stride; (height, width)) and test pipeline (img_scale as
    mmseg writes it, (2560, 640): keep-ratio resizing reads only its long and short side; img_ratios, flip,
    SETR_Resize). ``windows_per_forward``: windows of each image per model call."""

    crop_size: tuple[int, int]
    stride: tuple[int, int]
    img_scale: tuple[int, int]
    mode: str = 'slide'
    ratios: tuple[float, ...] = ()
    flip: bool = False
    setr_multi_scale: bool = True
    windows_per_forward: int = 2
    pad_to_crop: bool = True

    def __post_init__(self):
        if self.mode not in TEST_MODES:
            raise SettingsError(('mode',), f'the test mode must be one of {list(TEST_MODES)}, got {self.mode!r}')
        for field in ('crop_size', 'stride', 'img_scale'):
            if len(getattr(self, field)) != 2 or min(getattr(self, field)) < 1:
                raise SettingsError((field,), f'{field} needs two positive sizes, got {getattr(self, field)}')
        if self.windows_per_forward < 1:
            raise SettingsError(('windows_per_forward',), f'windows per forward must be positive, got '
                                                          f'{self.windows_per_forward}')
        if any(stride > crop for stride, crop in zip(self.stride, self.crop_size)):
            raise SettingsError(('stride', 'crop_size'), f'a stride of {self.stride} over crops of {self.crop_size} '
                                                         f'leaves pixels no window covers')
        if any(not ratio > 0 for ratio in self.ratios):
            raise SettingsError(('ratios',), f'scale ratios must be positive, got {list(self.ratios)}')


# the config key of each InferenceSettings field that settings_from_config reads
CONFIG_KEYS = {'crop_size': 'DATA.IMAGE_SIZE', 'stride': 'SEG.SLIDE_STRIDE', 'img_scale': 'SEG.IMG_SCALE',
               'mode': 'SEG.TEST_MODE', 'ratios': 'SEG.MS_RATIOS', 'windows_per_forward': 'SEG.WINDOWS_PER_FORWARD'}


def settings_from_config(config) -> InferenceSettings:
    """The SEG keys' settings; the crop is DATA.IMAGE_SIZE (the model's input), the test scale SEG.IMG_SCALE (as the
    data pipeline's). A refused value names its key and where it came from."""
    seg = config.SEG
    img_scale = seg.IMG_SCALE
    if len(img_scale) != 2:
        raise ConfigError(f'{named_origin(config, "SEG.IMG_SCALE")}SEG.IMG_SCALE: the test scale needs two sizes '
                          f'(like [2560, 640]), got {img_scale!r}')
    if not all(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) for ratio in seg.MS_RATIOS):
        raise ConfigError(f'{named_origin(config, "SEG.MS_RATIOS")}SEG.MS_RATIOS must be numbers, got '
                          f'{list(seg.MS_RATIOS)}')
    crop, stride = config.DATA.IMAGE_SIZE, seg.SLIDE_STRIDE
    try:
        return InferenceSettings(crop_size=(crop, crop), stride=(stride, stride), img_scale=tuple(img_scale),
                                 mode=seg.TEST_MODE, ratios=tuple(float(r) for r in seg.MS_RATIOS), flip=seg.FLIP,
                                 setr_multi_scale=seg.SETR_MULTI_SCALE, windows_per_forward=seg.WINDOWS_PER_FORWARD)
    except SettingsError as err:
        keys = [CONFIG_KEYS[field] for field in err.fields]
        raise ConfigError(f'{named_origin(config, *keys)}{" and ".join(keys)}: {err}') from err


def rescaled_shape(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's imrescale size: the image as large as fits within ``scale``'s long and short side, keeping its
    ratio, each side rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def setr_shape(height: int, width: int, scale: Sequence[float], crop: int) -> tuple[int, int]:
    """unilm's SETR_Resize (setr_multi_scale) size: the short side min(scale), raised to ``crop`` when smaller,
    the long side following the image's ratio whatever its length, through the same rescale arithmetic."""
    short = max(min(scale), crop)
    target = (short * height / width, short) if height > width else (short, short * width / height)
    return rescaled_shape(height, width, target)


def view_shapes(height: int, width: int, settings: InferenceSettings) -> list[tuple[int, int]]:
    """The (height, width) an image of ``height`` x ``width`` is resized to for each scale, in mmseg's order."""
    if not settings.ratios:
        return [rescaled_shape(height, width, settings.img_scale)]
    scales = [(int(settings.img_scale[0] * ratio), int(settings.img_scale[1] * ratio)) for ratio in settings.ratios]
    if settings.setr_multi_scale:
        return [setr_shape(height, width, scale, settings.crop_size[0]) for scale in scales]
    return [rescaled_shape(height, width, scale) for scale in scales]


def window_spans(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the windows along one side of ``size`` pixels: mmseg's grid, the last window moved back to
    end at the edge; one window of the whole side when it is shorter than the crop."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for index in range(count):
        end = min(index * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def window_boxes(height: int, width: int, settings: InferenceSettings) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each sliding window, row by row."""
    rows = window_spans(height, settings.crop_size[0], settings.stride[0])
    columns = window_spans(width, settings.crop_size[1], settings.stride[1])
    return [(top, bottom, left, right) for top, bottom in rows for left, right in columns]


def window_counts(height: int, width: int, settings: InferenceSettings) -> np.ndarray:
    """float32 [height, width]: how many windows cover each pixel (mmseg's count_mat)."""
    counts = np.zeros((height, width), np.float32)
    for top, bottom, left, right in window_boxes(height, width, settings):
        counts[top:bottom, left:right] += 1
    return counts


def _resize(values: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """Bilinear resize with align_corners False (mmseg's resize of logits), in float32."""
    values = values.astype('float32')
    if tuple(values.shape[2:]) == tuple(size):
        return values
    return F.interpolate(values, size=list(size), mode='bilinear', align_corners=False)


def _window_logits(model: Model, crops: paddle.Tensor, settings: InferenceSettings) -> paddle.Tensor:
    """The model's logits for same-sized crops, resized to the crops' size; a crop under the crop size is padded
    bottom/right with 0 first when ``pad_to_crop`` and the padding's logits cut off."""
    height, width = crops.shape[2:]
    pad_h, pad_w = settings.crop_size[0] - height, settings.crop_size[1] - width
    if settings.pad_to_crop and (pad_h > 0 or pad_w > 0):
        padded = F.pad(crops, [0, max(pad_w, 0), 0, max(pad_h, 0)], value=0.0, data_format='NCHW')
        return _resize(model(padded), padded.shape[2:])[:, :, :height, :width]
    return _resize(model(crops), (height, width))


def slide_logits(model: Model, images: paddle.Tensor, settings: InferenceSettings) -> paddle.Tensor:
    """float32 [N, C, H, W]: the windows' logits summed in place and divided by each pixel's window count,
    ``windows_per_forward`` windows of each image per model call."""
    num_images, _, height, width = images.shape
    boxes = window_boxes(height, width, settings)
    per_call = settings.windows_per_forward
    total = None
    for first in range(0, len(boxes), per_call):
        chunk = boxes[first:first + per_call]
        crops = paddle.concat([images[:, :, top:bottom, left:right] for top, bottom, left, right in chunk])
        logits = _window_logits(model, crops, settings)
        if total is None:
            total = paddle.zeros([num_images, logits.shape[1], height, width], 'float32')
        for index, (top, bottom, left, right) in enumerate(chunk):
            total[:, :, top:bottom, left:right] += logits[index * num_images:(index + 1) * num_images]
    return total / paddle.to_tensor(window_counts(height, width, settings))


def view_logits(model: Model, images: paddle.Tensor, settings: InferenceSettings) -> paddle.Tensor:
    """float32 [N, C, h, w]: logits at the size of the (resized) images, by the settings' test mode."""
    if settings.mode == 'slide':
        return slide_logits(model, images, settings)
    return _resize(model(images), images.shape[2:])


def view_probs(model: Model, images: paddle.Tensor, settings: InferenceSettings, *,
               out_size: Sequence[int], flip: bool) -> paddle.Tensor:
    """Softmax probabilities [N, C, out_h, out_w] of one view: the images mirrored first when ``flip``, the
    logits resized to ``out_size`` (the original image), the output mirrored back."""
    if flip:
        images = paddle.flip(images, axis=[3])
    probs = F.softmax(_resize(view_logits(model, images, settings), out_size), axis=1)
    return paddle.flip(probs, axis=[3]) if flip else probs


@paddle.no_grad()
def segment_probs(model: Model, view: View, out_size: Sequence[int], settings: InferenceSettings) -> paddle.Tensor:
    """float32 [N, C, H, W]: the softmax outputs averaged over every scale (and its mirror when flipping) of
    images whose original size is ``out_size`` (H, W); ``view`` gives the images resized to a scale, once per
    size: ratios that give the same size (0.5, 0.75 and 1.0 under SETR_Resize) are the same view, inferred once
    and counted as often as mmseg counts it."""
    shapes = view_shapes(*out_size, settings)
    flips = (False, True) if settings.flip else (False,)
    total = None
    for shape in dict.fromkeys(shapes):
        images = view(shape)
        images = (images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images)).astype('float32')
        if tuple(images.shape[2:]) != tuple(shape):
            raise ValueError(f'the view for {shape} gave images of {tuple(images.shape)}')
        for flip in flips:
            probs = view_probs(model, images, settings, out_size=out_size, flip=flip) * shapes.count(shape)
            total = probs if total is None else total + probs
    return total / (len(shapes) * len(flips))


def segment(model: Model, view: View, out_size: Sequence[int], settings: InferenceSettings) -> paddle.Tensor:
    """int64 [N, H, W]: the class of each pixel of the original images (argmax of ``segment_probs``)."""
    return paddle.argmax(segment_probs(model, view, out_size, settings), axis=1)
