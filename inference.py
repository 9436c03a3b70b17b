"""Running a trained BEiT outside training: weights into a model (a classifier, or a segmentor), and the two
predictors predict.py chooses from.

Both predictors map a batch prepared by ``transforms.get_val_transforms`` then ``host_normalise`` (float32
[B, 3, S, S]) to logits [B, NUM_CLASSES] as numpy, so the dygraph model and the exported Paddle Inference model
see exactly the same preprocessing. An exported model is ``PREFIX.json`` + ``PREFIX.pdiparams`` (Paddle 3's PIR
format) and ``PREFIX.yaml``, the config it was exported with: the one place its input size and preprocessing are
recorded. A segmentor's export is its crop model, whose input is named CROPS_INPUT instead of IMAGE_INPUT: each
predictor refuses the other's program by that name before running it (seg_predict.py runs the crop model).
"""
import contextlib
import os
import sys
import tempfile

import numpy as np
import paddle
from paddle import inference as paddle_infer
from paddle.static import InputSpec

from beit import CheckpointMismatchError, build_beit
from beit_seg import BACKBONE_PREFIX, BeitUperNet, build_beit_upernet
from checkpoint import CheckpointError, load_pretrained, pretrained_state_dict
from config import ConfigError, get_config
from errors import BadInputError
from paddle_internals import cpu_supports_bfloat16, set_cpu_threads
from utils import cpu_threads_per_process

PRECISIONS = ('fp32', 'bf16')
IMAGE_INPUT, CROPS_INPUT = 'image', 'crops'  # the input names of a classifier's (or backbone's) and a segmentor's
EXPORTED_SUFFIXES = ('.json', '.pdiparams', '.yaml')
# What an exported model fixes: a config that disagrees would feed it other pixels or another size.
EXPORT_CONTRACT_KEYS = ('DATA.IMAGE_SIZE', 'DATA.CROP_PCT', 'DATA.INTERPOLATION', 'DATA.IMAGENET_MEAN',
                        'DATA.IMAGENET_STD', 'MODEL.NUM_CLASSES')
# A segmentor's export: its crop, classes and normalisation, and how the images are scaled and the crops slid over
# them (every key that changes the map; SEG.WINDOWS_PER_FORWARD only groups the crops into calls).
SEG_EXPORT_CONTRACT_KEYS = ('DATA.IMAGE_SIZE', 'DATA.IMAGENET_MEAN', 'DATA.IMAGENET_STD', 'SEG.NUM_CLASSES',
                            'SEG.IMG_SCALE', 'SEG.SLIDE_STRIDE', 'SEG.TEST_MODE', 'SEG.MS_RATIOS', 'SEG.FLIP',
                            'SEG.SETR_MULTI_SCALE')
# Paddle 3.3.1's oneDNN executor cannot run bilinear_interp, which a segmentor's heads hold: "ConvertPirAttribute2
# RuntimeAttribute not support [pir::ArrayAttribute<pir::DoubleAttribute>]" (PaddlePaddle/Paddle#79749). Without
# this pass the ops keep Paddle's CPU kernels while the oneDNN fusion passes still run (tests/test_seg_predict.py
# checks that the bug is still there).
ONEDNN_PLACEMENT_PASS = 'onednn_placement_pass'


class WeightsError(BadInputError):
    """Weights or an exported model that are missing, unreadable or do not fit the config; says which file."""


def _fit_weights(model: paddle.nn.Layer, config, weights_path: str, use_ema: bool) -> list:
    """checkpoint.load_pretrained with ``complete``, the rule of -eval (a head of another class count is an error,
    not a random head); returns its notes. A missing or unreadable file is a WeightsError; weights that do not fit
    raise CheckpointMismatchError, for the caller to say why."""
    try:
        notes, _ = load_pretrained(model, weights_path, use_ema, config.MODEL.REL_POS_INTERP, complete=True,
                                   trust_pickle=config.TRUST_PICKLE)
    except CheckpointError as err:
        raise WeightsError(str(err)) from err
    return notes


def load_model(config, weights_path: str, use_ema: bool = False) -> tuple[paddle.nn.Layer, list]:
    """The config's BEiT classifier in eval mode with every tensor from ``weights_path``, and the notes of the
    fitting; a segmentor's file is refused as such."""
    model = build_beit(config)
    try:
        notes = _fit_weights(model, config, weights_path, use_ema)
    except CheckpointMismatchError as err:
        if _holds_segmentor(weights_path, use_ema, config.TRUST_PICKLE):
            raise WeightsError(f'-pretrained {weights_path}: a segmentation model\'s weights (backbone.*, '
                               'decode_head.*), not a classifier\'s: segment images with predict_segment.py, export '
                               'with export_model.py -segmentation') from err
        raise WeightsError(str(err)) from err
    return model.eval(), notes


def _holds_segmentor(weights_path: str, use_ema: bool, trust_pickle: bool) -> bool:
    """Whether the file's tensors are named as a segmentor's (BeitUperNet.fit_pretrained's rule)."""
    state_dict, _ = pretrained_state_dict(weights_path, use_ema, trust_pickle=trust_pickle)
    return any(name.startswith(BACKBONE_PREFIX) for name in state_dict)


def load_segmentor(config, weights_path: str, use_ema: bool = False) -> tuple[BeitUperNet, list]:
    """The config's BeitUperNet (SEG.* keys, DATA.IMAGE_SIZE the crop) in eval mode with every tensor from
    ``weights_path``, and the notes of the fitting; a classification or pre-training file is refused
    (BeitUperNet.fit_pretrained)."""
    model = build_beit_upernet(config)
    try:
        notes = _fit_weights(model, config, weights_path, use_ema)
    except CheckpointMismatchError as err:
        raise WeightsError(str(err)) from err
    return model.eval(), notes


class BlockFeatures(paddle.nn.Layer):
    """A BEiT as a backbone for dense tasks: the program's outputs are the maps [B, D, S/p, S/p] of the chosen
    blocks (``Beit.forward_intermediates`` without the final norm), one output per block in block order."""

    def __init__(self, model: paddle.nn.Layer, indices: int | list[int]):
        super().__init__()
        self.model = model
        self.indices = indices

    def forward(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        return self.model.forward_intermediates(images, self.indices, stop_early=True, intermediates_only=True)


def export(model: paddle.nn.Layer, config, prefix: str, *, input_name: str = IMAGE_INPUT) -> None:
    """Trace ``model`` for [any batch, C, S, S] float32 input named ``input_name`` and save it with its config next
    to it."""
    size = config.DATA.IMAGE_SIZE
    spec = InputSpec([None, config.DATA.IMAGE_CHANNELS, size, size], 'float32', input_name)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paddle.jit.save(paddle.jit.to_static(model.eval(), input_spec=[spec], full_graph=True), prefix)
    recorded = config.clone()  # what predict.py re-reads: no -trust_pickle (a config file may not set it)
    recorded.defrost()
    recorded.TRUST_PICKLE = False
    with open(prefix + '.yaml', 'w', encoding='utf-8') as f:
        f.write(recorded.dump())


def bf16_supported() -> bool:
    """oneDNN's own check of this CPU for bfloat16 kernels (AVX-512 BF16 / AMX, or emulated on AVX-512)."""
    return cpu_supports_bfloat16()


class DygraphPredictor:
    """The Paddle model as it is in memory (a loaded .pdparams)."""

    def __init__(self, model: paddle.nn.Layer, num_threads: int | None = None):
        set_cpu_threads(num_threads or cpu_threads_per_process())
        self.model = model.eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return self.model(paddle.to_tensor(batch)).numpy()


@contextlib.contextmanager
def _native_stdout_to_stderr():
    """oneDNN passes print debug words to the C++ stdout, which would corrupt predict.py's JSON output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def require_exported_model(prefix: str) -> None:
    missing = [prefix + suffix for suffix in EXPORTED_SUFFIXES if not os.path.isfile(prefix + suffix)]
    if missing:
        raise WeightsError(f'no exported model at {prefix}: missing {", ".join(missing)} (make one with '
                           'export_model.py)')


def exported_config(prefix: str):
    """The config an exported model was made with (PREFIX.yaml), needed to prepare its input; not frozen."""
    require_exported_model(prefix)
    return get_config(prefix + '.yaml')


def check_export_contract(config, prefix: str, keys: tuple[str, ...] = EXPORT_CONTRACT_KEYS) -> None:
    """Refuse a config that would prepare images differently from the one the model was exported with: any of
    ``keys`` (a classifier's, or SEG_EXPORT_CONTRACT_KEYS) that differs."""
    exported = exported_config(prefix)
    for key in keys:
        group, name = key.split('.')
        if config[group][name] != exported[group][name]:
            raise ConfigError(f'{key} is {config[group][name]!r} but {prefix} was exported with '
                              f'{exported[group][name]!r}; use its config ({prefix}.yaml) or re-export')


class ExportedPredictor:
    """An exported model run by paddle.inference on the CPU, in fp32 or oneDNN bfloat16. ``onednn_placement``
    False: without the pass that moves every op it can to oneDNN kernels, for programs it cannot run
    (ONEDNN_PLACEMENT_PASS); fp32 only."""

    def __init__(self, prefix: str, precision: str = 'fp32', num_threads: int | None = None, *,
                 onednn_placement: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {precision!r}')
        if precision != 'fp32' and not onednn_placement:
            raise ValueError('bf16 is offered with the oneDNN placement only (onednn_placement=True)')
        if precision == 'bf16' and not bf16_supported():
            raise WeightsError('bf16 inference needs a CPU with bfloat16 support (AVX-512 BF16 or AMX); '
                               'oneDNN reports none here: use -precision fp32')
        require_exported_model(prefix)
        config = paddle_infer.Config(prefix + '.json', prefix + '.pdiparams')
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(num_threads or cpu_threads_per_process())
        config.enable_onednn()  # its fused fc/attention kernels (measured: docs/cpu_speed.md)
        if not onednn_placement:
            config.delete_pass(ONEDNN_PLACEMENT_PASS)
        if precision == 'bf16':
            config.enable_onednn_bfloat16()
        self.prefix = prefix
        self.precision = precision
        self.predictor = paddle_infer.create_predictor(config)
        self.input_name = self.predictor.get_input_names()[0]
        self.input = self.predictor.get_input_handle(self.input_name)
        self.outputs = [self.predictor.get_output_handle(name) for name in self.predictor.get_output_names()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the program: the logits, or the maps of a block-feature export."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.input.reshape(list(batch.shape))
        self.input.copy_from_cpu(batch)
        with _native_stdout_to_stderr():
            self.predictor.run()
        return [output.copy_to_cpu() for output in self.outputs]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The logits [B, NUM_CLASSES]; an export of block features or of a segmentor is refused, not read as
        logits."""
        if self.input_name == CROPS_INPUT:
            raise WeightsError(f'{self.prefix} is a segmentor\'s crop model (export_model.py -segmentation), not a '
                               f'classifier: segment images with predict_segment.py -inference_model {self.prefix}')
        outputs = self.run(batch)
        if len(outputs) != 1 or outputs[0].ndim != 2:
            raise WeightsError(f'{self.prefix} returns block features {[list(out.shape) for out in outputs]}, '
                               'not logits (exported with -block_features): export the classifier without it')
        return outputs[0]


def exported_predictor(model: paddle.nn.Layer, config, precision: str) -> ExportedPredictor:
    """``model`` exported to a temporary folder and loaded into Paddle Inference (which reads the files at once)."""
    with tempfile.TemporaryDirectory() as folder:
        export(model, config, os.path.join(folder, 'beit'))
        return ExportedPredictor(os.path.join(folder, 'beit'), precision)


class PredictorAsModel:
    """An exported copy of a model in Paddle Inference, with the model interface engine.evaluate uses."""

    def __init__(self, model: paddle.nn.Layer, config, precision: str):
        self.predictor = exported_predictor(model, config, precision)

    def eval(self) -> 'PredictorAsModel':
        return self

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        return paddle.to_tensor(self.predictor(images.numpy()))
