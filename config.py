"""YACS configuration: defaults, YAML files with BASE inheritance, -opts overrides and validation.

Defaults describe beit_base_patch16_224 fine-tuned with the official recipe; YAML files in configs/ set
any subset. Unknown keys, values of the wrong type and values out of range are errors that name the key and
where its value came from (set_value records the file, flag or -opts that set each value: origin).
"""
import ast
import os
from collections.abc import Sequence

import yaml
from yacs.config import CfgNode as CN

from errors import BadInputError

# Choices, defined here once: validate_config checks them and the module that implements them imports them
# (config.py itself imports no paddle).
DATASETS = ('imagenet2012', 'imagefolder')  # datasets.py: list files, class folders
BAD_IMAGE_POLICIES = ('error', 'skip')  # datasets.py
INTERPOLATIONS = ('bilinear', 'bicubic')  # transforms.py
SECOND_INTERPOLATIONS = (*INTERPOLATIONS, 'lanczos')  # transforms.py: the tokenizer's input
REL_POS_INTERPOLATIONS = ('cubic', 'linear')  # pos_resample.py
MIXUP_MODES = ('batch', 'pair', 'elem')  # mixup.py
RANDOM_ERASE_MODES = ('const', 'rand', 'pixel')  # random_erasing.py
LINPROBE_OPTIMIZERS = ('adamw', 'sgd')  # task_linprobe.py
TOKENIZERS = ('dalle', 'vqkd')  # task_pretrain.py: BEiT v1's DALL-E encoder, BEiT v2's VQ-KD tokenizer
VQKD_TEACHERS = ('beit', 'clip')  # vqkd_teacher.py's TEACHERS: whose patch features tokenizer training distils

_C = CN()

# data settings
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 64  # per process
_C.DATA.BATCH_SIZE_EVAL = 64  # per process
_C.DATA.DATA_PATH = ''  # folder holding train_list.txt / val_list.txt
_C.DATA.DATASET = 'imagenet2012'
_C.DATA.IMAGE_SIZE = 224
_C.DATA.IMAGE_CHANNELS = 3
_C.DATA.CROP_PCT = 0.9  # eval: resize the short side to IMAGE_SIZE / CROP_PCT, then center crop
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.IMAGENET_MEAN = [0.5, 0.5, 0.5]
_C.DATA.IMAGENET_STD = [0.5, 0.5, 0.5]
_C.DATA.NUM_WORKERS = -1  # loader workers per process; -1: min(8, cores // processes on the machine)
_C.DATA.BAD_IMAGE_POLICY = 'error'  # an undecodable image: 'error' stops with its path, 'skip' counts it

# model settings
_C.MODEL = CN()
_C.MODEL.NAME = 'beit_base_patch16_224'
_C.MODEL.RESUME = ''  # training checkpoint to continue from
_C.MODEL.PRETRAINED = ''  # converted .pdparams to start from
_C.MODEL.PRETRAINED_EMA = False  # -pretrained given a training checkpoint: load its EMA weights instead of the model
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.PATCH_SIZE = 16
_C.MODEL.EMBED_DIM = 768
_C.MODEL.DEPTH = 12
_C.MODEL.NUM_HEADS = 12
_C.MODEL.MLP_RATIO = 4.0
_C.MODEL.QKV_BIAS = True  # q and v biases (k has none)
_C.MODEL.DROPOUT = 0.0  # after the position embedding, attention projection and MLP layers
_C.MODEL.ATTENTION_DROPOUT = 0.0
_C.MODEL.DROPPATH = 0.1  # stochastic depth rate of the last block
_C.MODEL.INIT_VALUES = 0.1  # layer scale init (0.1 base, 1e-5 large); 0 or null: no layer scale (unilm, timm)
_C.MODEL.USE_ABS_POS_EMB = False
_C.MODEL.USE_REL_POS_BIAS = True  # one table per block
_C.MODEL.USE_SHARED_REL_POS_BIAS = False  # one table for all blocks
_C.MODEL.USE_MEAN_POOLING = True  # mean of patch tokens + fc_norm; False: cls token after norm
_C.MODEL.INIT_SCALE = 0.001  # head weights and bias scaled after init
_C.MODEL.FUSED_ATTN = False  # sdpa's flash kernel on a GPU of capability >= 8.0 under float16/bfloat16 AMP (untested)
_C.MODEL.TO_STATIC = False  # compile the model with paddle.jit.to_static (whole graph) for training and eval
_C.MODEL.RECOMPUTE = False  # recompute block activations in backward to save memory
_C.MODEL.REL_POS_INTERP = 'cubic'  # resampling of bias tables for a new resolution: cubic (unilm) or linear (timm)

# training settings
_C.TRAIN = CN()
_C.TRAIN.LAST_EPOCH = 0
_C.TRAIN.NUM_EPOCHS = 30
_C.TRAIN.WARMUP_EPOCHS = 5
_C.TRAIN.WEIGHT_DECAY = 1e-8
_C.TRAIN.BASE_LR = 2e-5
_C.TRAIN.WARMUP_START_LR = 1e-6
_C.TRAIN.END_LR = 1e-6
_C.TRAIN.LINEAR_SCALED_LR = 512  # LR = BASE_LR * total batch / this; 0 uses BASE_LR as it is
_C.TRAIN.LAYER_DECAY = 0.85
_C.TRAIN.GRAD_CLIP = 0.0  # global norm; 0 disables clipping
_C.TRAIN.ACCUM_ITER = 1
_C.TRAIN.MODEL_EMA = False
_C.TRAIN.MODEL_EMA_DECAY = 0.9999
_C.TRAIN.SMOOTHING = 0.1
_C.TRAIN.RRC_SCALE = [0.08, 1.0]  # RandomResizedCrop area range
_C.TRAIN.RRC_RATIO = [0.75, 1.3333333333333333]  # RandomResizedCrop aspect-ratio range
_C.TRAIN.HFLIP_PROB = 0.5
_C.TRAIN.COLOR_JITTER = 0.4  # used when neither RandAugment nor AutoAugment is on
_C.TRAIN.RAND_AUGMENT = True
_C.TRAIN.RAND_AUGMENT_CONFIG = 'rand-m9-mstd0.5-inc1'
_C.TRAIN.AUTO_AUGMENT = False
_C.TRAIN.AUTO_AUGMENT_POLICY = 'original'
_C.TRAIN.MIXUP_ALPHA = 0.8
_C.TRAIN.CUTMIX_ALPHA = 1.0
_C.TRAIN.CUTMIX_MINMAX = []  # [min, max] box ratio; empty uses CUTMIX_ALPHA
_C.TRAIN.MIXUP_PROB = 1.0
_C.TRAIN.MIXUP_SWITCH_PROB = 0.5
_C.TRAIN.MIXUP_MODE = 'batch'
_C.TRAIN.RANDOM_ERASE_PROB = 0.25
_C.TRAIN.RANDOM_ERASE_MODE = 'pixel'
_C.TRAIN.RANDOM_ERASE_COUNT = 1
_C.TRAIN.RANDOM_ERASE_SPLIT = False

_C.TRAIN.OPTIMIZER = CN()  # AdamW, the only optimizer (optim.py)
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]

# masked image modeling pre-training (main_pretrain.py)
_C.PRETRAIN = CN()
_C.PRETRAIN.VOCAB_SIZE = 8192  # visual tokens: the tokenizer's codebook size and lm_head's outputs
_C.PRETRAIN.SECOND_INPUT_SIZE = 112  # tokenizer view in pixels; 8 px per token, so its grid must be the patch grid
_C.PRETRAIN.SECOND_INTERPOLATION = 'lanczos'  # resize of the tokenizer view (the patch view uses DATA.INTERPOLATION)
_C.PRETRAIN.NUM_MASK_PATCHES = 75  # masked patches per image
_C.PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK = 16
_C.PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK = 0  # 0: no limit below NUM_MASK_PATCHES
_C.PRETRAIN.TOKENIZER = 'dalle'  # whose visual tokens are the targets: 'dalle' (BEiT v1) or 'vqkd' (BEiT v2, VQKD.*)
_C.PRETRAIN.TOKENIZER_WEIGHTS = ''  # DALL-E encoder (load_dalle_weights.py) or VQ-KD tokenizer .pdparams
_C.PRETRAIN.RANDOM_TOKENIZER = False  # no TOKENIZER_WEIGHTS: allow a random-weight tokenizer (tests and demos only)
_C.PRETRAIN.TOKENIZER_HIDDEN = 256  # DALL-E encoder width (n_hid)
_C.PRETRAIN.TOKENIZER_BLOCKS_PER_GROUP = 2  # DALL-E encoder depth (n_blk_per_group)
# BEiT v2's CLS-token pre-training branch (unilm's *_cls_pt models and their --early_layers, --head_layers,
# --shared_lm_head flags): head blocks over the final cls token and the patch tokens after EARLY_LAYERS blocks
_C.PRETRAIN.CLS_PT = False
_C.PRETRAIN.EARLY_LAYERS = 6  # unilm's default; its B recipe uses 9, L 21
_C.PRETRAIN.HEAD_LAYERS = 2
_C.PRETRAIN.SHARED_LM_HEAD = True

# The VQ-KD tokenizer of BEiT v2 (vqkd_tokenizer.py): the one pre-training loads (PRETRAIN.TOKENIZER 'vqkd'; its
# input is PRETRAIN.SECOND_INPUT_SIZE pixels) and the one tokenizer training trains (its input is DATA.IMAGE_SIZE).
# Defaults: unilm's vqkd_encoder_base_decoder_*x768x12 (ViT-B/16 encoder, 8192 x 32 codebook).
_C.VQKD = CN()
_C.VQKD.PATCH_SIZE = 16
_C.VQKD.EMBED_DIM = 768
_C.VQKD.DEPTH = 12
_C.VQKD.NUM_HEADS = 12
_C.VQKD.MLP_RATIO = 4.0
_C.VQKD.CODEBOOK_SIZE = 8192  # must equal PRETRAIN.VOCAB_SIZE when pre-training with it
_C.VQKD.CODEBOOK_DIM = 32
# tokenizer training (main_tokenizer.py, task_tokenizer.py; unilm's run_vqkd_training.py and its defaults)
_C.VQKD.DECODER_DEPTH = 1  # blocks of the decoder ViT (EMBED_DIM, NUM_HEADS, MLP_RATIO as the encoder's): 1 or 3
_C.VQKD.EMA_DECAY = 0.99  # the codebook's EMA decay
_C.VQKD.BETA = 1.0  # weight of the commitment loss (the quantiser's loss)
_C.VQKD.KMEANS_INIT = True  # the codebook from k-means (cosine) on the first training batch; False: random unit rows
_C.VQKD.KMEANS_ITERS = 10
_C.VQKD.TEACHER = 'beit'  # the frozen model whose patch features the decoder reconstructs
_C.VQKD.TEACHER_CFG = ''  # the teacher's config file ('beit': a BEiT config, e.g. configs/beit_tiny_fashion_mnist.yaml)
_C.VQKD.TEACHER_WEIGHTS = ''  # the teacher's .pdparams (a converted file or a training checkpoint)

# linear probing (main_linprobe.py): unilm's beit/run_linear_eval.py protocol on the frozen encoder. The run trains
# LINPROBE.NUM_EPOCHS epochs of LINPROBE.BATCH_SIZE images whatever TRAIN.NUM_EPOCHS and DATA.BATCH_SIZE (the
# model's own recipe) say; no warm-up, cosine decay to 0, no gradient clipping.
_C.LINPROBE = CN()
_C.LINPROBE.BLOCKS = []  # block indices with a classifier (0-based, negative from the end); []: every block
_C.LINPROBE.NUM_EPOCHS = 100
_C.LINPROBE.BATCH_SIZE = 128  # per process (unilm's --batch_size_per_gpu); -batch_size sets it in main_linprobe.py
_C.LINPROBE.OPTIMIZER = 'adamw'
_C.LINPROBE.BASE_LR = 1e-3  # LR = BASE_LR * total batch / LINEAR_SCALED_LR
_C.LINPROBE.LINEAR_SCALED_LR = 256  # 0 uses BASE_LR as it is
_C.LINPROBE.WEIGHT_DECAY = 1e-4  # unilm: 1e-4 with adamw, 0 with sgd
_C.LINPROBE.MOMENTUM = 0.9  # sgd only

# Semantic segmentation (unilm's beit/semantic_segmentation: UperNet on BEiT, ADE20K); the crop is DATA.IMAGE_SIZE.
_C.SEG = CN()
# the model (beit_seg.py)
_C.SEG.NUM_CLASSES = 150
_C.SEG.OUT_INDICES = [3, 5, 7, 11]  # 0-based blocks feeding fpn1-fpn4 (unilm's out_indices; L: 7 11 15 23)
_C.SEG.CHANNELS = 768  # UperHead's width (mmseg's decode_head channels: 768 B, 1024 L)
_C.SEG.POOL_SCALES = [1, 2, 3, 6]  # pyramid pooling output sizes (mmseg's pool_scales)
_C.SEG.AUX_CHANNELS = 256  # the auxiliary FCNHead's width (mmseg's auxiliary_head channels)
_C.SEG.DROPOUT = 0.1  # Dropout2d before each classifier (mmseg's dropout_ratio)
# the schedule (seg_optim.py): mmcv's linear warm-up, then poly decay to 0, stepped per iteration over the whole run
# (mmcv's max_iters is TRAIN.NUM_EPOCHS x the optimizer steps of an epoch: the job counts epochs)
_C.SEG.WARMUP_ITERS = 1500  # optimizer steps of linear warm-up (mmcv's warmup_iters; L 640's 3000 count 2 per step)
_C.SEG.WARMUP_RATIO = 1e-6  # the first iteration's LR over the poly LR (mmcv's warmup_ratio)
_C.SEG.POWER = 1.0  # poly exponent (mmcv's power)

# the data (seg_datasets.py, seg_transforms.py)
_C.SEG.DATASET = 'ade20k'  # 'ade20k': DATA_PATH/images/<split>/*.jpg + annotations/<split>/*.png; 'list': *_list.txt
_C.SEG.IGNORE_INDEX = 255  # label value the loss and the metric skip; padding and reduce_zero_label write it
_C.SEG.REDUCE_ZERO_LABEL = True  # mmseg's reduce_zero_label (ADE20K): raw 0 -> 255, v -> v - 1, 255 stays 255
_C.SEG.CHECK_LABEL_VALUES = True  # decode every annotation before training to check its values; False: at load
_C.SEG.IMG_SCALE = [2560, 640]  # mmseg's img_scale (long, short): resize keeping the ratio to fit within it
_C.SEG.RATIO_RANGE = [0.5, 2.0]  # training: IMG_SCALE times r, r uniform in this range
_C.SEG.CAT_MAX_RATIO = 0.75  # RandomCrop: redraw (10 tries) a crop whose largest class has this share or more
_C.SEG.FLIP_PROB = 0.5  # RandomFlip, horizontal
_C.SEG.BRIGHTNESS_DELTA = 32  # PhotoMetricDistortion: brightness + uniform(-delta, delta)
_C.SEG.CONTRAST_RANGE = [0.5, 1.5]  # PhotoMetricDistortion: contrast factor range
_C.SEG.SATURATION_RANGE = [0.5, 1.5]  # PhotoMetricDistortion: saturation factor range
_C.SEG.HUE_DELTA = 18  # PhotoMetricDistortion: hue + randint(-delta, delta) in OpenCV's 2-degree units

# the evaluation (seg_inference.py, seg_metrics.py)
_C.SEG.SLIDE_STRIDE = 426  # sliding 640-pixel windows at this stride (unilm's test_cfg)
_C.SEG.TEST_MODE = 'slide'  # mmseg's test_cfg.mode: 'slide' (DATA.IMAGE_SIZE windows) or 'whole' (one forward)
_C.SEG.MS_RATIOS = []  # img_ratios of unilm's _ms configs ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75]); []: one scale
_C.SEG.FLIP = False  # MultiScaleFlipAug's flip: also infer on the mirrored image, average the softmax outputs
_C.SEG.SETR_MULTI_SCALE = True  # MS_RATIOS sizes as unilm's SETR_Resize: short side at least the crop, no long cap
_C.SEG.WINDOWS_PER_FORWARD = 2  # sliding windows (of one image) per model call: memory vs calls; 2 = ADE's usual

# the task (task_segment.py)
_C.SEG.AUX_LOSS_WEIGHT = 0.4  # loss = main + this x the auxiliary head's (mmseg's auxiliary loss_weight)
_C.SEG.LINEAR_SCALED_LR = 0  # replaces TRAIN.LINEAR_SCALED_LR: 0 takes TRAIN.BASE_LR as it is (unilm's configs)

# mixed precision
_C.AMP = False
_C.AMP_LEVEL = 'O1'
_C.AMP_DTYPE = 'float16'
_C.AMP_INIT_SCALE = 65536.0
_C.AMP_INCR_EVERY_N_STEPS = 2000
_C.AMP_DECR_EVERY_N_NAN_OR_INF = 1

# run settings
_C.SAVE = './output'
_C.SAVE_FREQ = 1  # epochs between checkpoints
_C.KEEP_CHECKPOINTS = 3  # newest epoch checkpoints this run keeps (plus checkpoint-best.pdparams); 0 keeps all
_C.REPORT_FREQ = 20  # steps between log lines
_C.VALIDATE_FREQ = 1  # epochs between evaluations
_C.SEED = 0
_C.EVAL = False
_C.EVAL_BACKEND = 'dygraph'  # -eval runs: dygraph, or the exported model in Paddle Inference (CPU) fp32 / bf16
_C.NGPUS = -1  # processes (-ngpus) of every main_*.py but main_single_gpu.py; -1: every visible GPU
_C.CPU_KERNELS = True  # CPU dygraph: cpu_ops.py's gradient kernels (the same results, faster); False: Paddle's own ops
_C.DETERMINISTIC = False  # GPU: Paddle's deterministic cuDNN kernels (slower); nothing to set on a CPU
# Read .pdparams with plain pickle (paddle.load), which runs any code a file holds, instead of safe_pickle's
# weights-only reader: set by the -trust_pickle flag (or -opts), never by a config file.
_C.TRUST_PICKLE = False

_CHOICES = {
    'EVAL_BACKEND': ('dygraph', 'inference', 'inference_bf16'),
    'DATA.INTERPOLATION': INTERPOLATIONS,
    'PRETRAIN.SECOND_INTERPOLATION': SECOND_INTERPOLATIONS,
    'DATA.BAD_IMAGE_POLICY': BAD_IMAGE_POLICIES,
    'DATA.DATASET': DATASETS,
    'MODEL.REL_POS_INTERP': REL_POS_INTERPOLATIONS,
    'TRAIN.MIXUP_MODE': MIXUP_MODES,
    'TRAIN.RANDOM_ERASE_MODE': RANDOM_ERASE_MODES,
    'LINPROBE.OPTIMIZER': LINPROBE_OPTIMIZERS,
    'PRETRAIN.TOKENIZER': TOKENIZERS,
    'AMP_LEVEL': ('O1', 'O2'),
    'AMP_DTYPE': ('float16', 'bfloat16'),
}
_POSITIVE = ('DATA.BATCH_SIZE', 'DATA.BATCH_SIZE_EVAL', 'DATA.IMAGE_SIZE', 'DATA.IMAGE_CHANNELS',
             'MODEL.PATCH_SIZE', 'MODEL.EMBED_DIM', 'MODEL.DEPTH', 'MODEL.NUM_HEADS', 'MODEL.MLP_RATIO',
             'TRAIN.ACCUM_ITER', 'SAVE_FREQ', 'REPORT_FREQ', 'VALIDATE_FREQ', 'PRETRAIN.VOCAB_SIZE',
             'PRETRAIN.SECOND_INPUT_SIZE', 'PRETRAIN.NUM_MASK_PATCHES', 'PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK',
             'PRETRAIN.TOKENIZER_HIDDEN', 'PRETRAIN.TOKENIZER_BLOCKS_PER_GROUP', 'PRETRAIN.EARLY_LAYERS',
             'PRETRAIN.HEAD_LAYERS', 'VQKD.PATCH_SIZE', 'VQKD.EMBED_DIM', 'VQKD.DEPTH', 'VQKD.NUM_HEADS',
             'VQKD.MLP_RATIO', 'VQKD.CODEBOOK_SIZE', 'VQKD.CODEBOOK_DIM', 'LINPROBE.NUM_EPOCHS',
             'LINPROBE.BATCH_SIZE', 'LINPROBE.BASE_LR')
_NON_NEGATIVE = ('MODEL.NUM_CLASSES', 'TRAIN.NUM_EPOCHS', 'TRAIN.WARMUP_EPOCHS',
                 'TRAIN.WEIGHT_DECAY', 'TRAIN.BASE_LR', 'TRAIN.LINEAR_SCALED_LR', 'TRAIN.GRAD_CLIP',
                 'TRAIN.LAST_EPOCH', 'PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK', 'KEEP_CHECKPOINTS',
                 'LINPROBE.LINEAR_SCALED_LR', 'LINPROBE.WEIGHT_DECAY', 'SEG.AUX_LOSS_WEIGHT', 'SEG.LINEAR_SCALED_LR')
_PROBABILITIES = ('DATA.CROP_PCT', 'MODEL.DROPOUT', 'MODEL.ATTENTION_DROPOUT', 'MODEL.DROPPATH',
                  'TRAIN.LAYER_DECAY', 'TRAIN.MODEL_EMA_DECAY', 'TRAIN.SMOOTHING', 'TRAIN.MIXUP_PROB',
                  'TRAIN.MIXUP_SWITCH_PROB', 'TRAIN.RANDOM_ERASE_PROB', 'TRAIN.HFLIP_PROB', 'LINPROBE.MOMENTUM')


class ConfigError(BadInputError):
    """A config file, flag or value that cannot be used; the message names the key and where its value came from."""


def get_default_config() -> CN:
    return _C.clone()


def lookup(config: CN, key: str):
    """The value of a dotted key (it must exist)."""
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f'{path}: not valid YAML: {err}') from err
    if not isinstance(values, dict):
        raise ConfigError(f'{path}: expected a mapping of config keys, got {type(values).__name__}')
    return values


def _base_files(values: dict, path: str) -> list:
    """BASE names files (relative to this one) to merge first, a string or a list."""
    bases = values.pop('BASE', [])
    bases = [bases] if isinstance(bases, str) else list(bases or [])
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, base) for base in bases if base]


_NULLABLE = ('MODEL.INIT_VALUES',)
_WORDS = {'true': True, 'false': False, 'null': None, 'none': None}


def _parse_text(text: str):
    """A command-line word as a Python value: 3, 1e-3, True, [0.9, 0.999], null."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _checked_value(key: str, value, default, source: str):
    if isinstance(value, str) and not isinstance(default, str):
        value = _parse_text(value)
    if value is None and key in _NULLABLE:
        return None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, (list, tuple)):
        return list(value)
    if type(value) is not type(default):
        raise ConfigError(f'{source}: {key} expects a {type(default).__name__} like {default!r}, got {value!r}')
    return value


# Keys of earlier versions, so that an old file's error says to delete the line rather than to fix a typo.
_REMOVED_KEYS = {
    'MODEL.TYPE': 'nothing read it; MODEL.NAME and the other MODEL keys describe the model',
    'TRAIN.OPTIMIZER.NAME': 'the optimizer is always AdamW',
    'SEG.NUM_ITERS': 'the poly schedule spans the run, TRAIN.NUM_EPOCHS x the optimizer steps of an epoch',
}


def _removal_note(key: str) -> str:
    return f' (removed: {_REMOVED_KEYS[key]}; delete it)' if key in _REMOVED_KEYS else ''


def set_value(config: CN, key: str, value, source: str) -> None:
    """Set one dotted key after checking that it exists and that the value has the default's type."""
    *parents, leaf = key.split('.')
    node = config
    for depth, part in enumerate(parents):
        node = node.get(part)
        if not isinstance(node, CN):
            raise ConfigError(f'{source}: unknown config key {key} ({".".join(parents[:depth + 1])} is not a group)')
    if leaf not in node:
        raise ConfigError(f'{source}: unknown config key {key}{_removal_note(key)}')
    if isinstance(node[leaf], CN):
        raise ConfigError(f'{source}: {key} is a group of keys, not a value')
    node[leaf] = _checked_value(key, value, node[leaf], source)
    config.__dict__.setdefault(_ORIGINS, {})[key] = (source, node[leaf])


_ORIGINS = '_origins'  # the root node's {key: (source, value)} of each value set_value set (not a config key)


def origin(config: CN, key: str) -> str | None:
    """Where ``key``'s value came from: the YAML file (a BASE file for the keys it set), flag or -opts that
    set_value set it from; None for a default, or for a value that code has changed since."""
    source, value = config.__dict__.get(_ORIGINS, {}).get(key, (None, None))
    return source if source is not None and lookup(config, key) == value else None


def named_origin(config: CN, *keys: str) -> str:
    """The prefix of an error about ``keys``: 'SOURCE: ' when one file, flag or -opts set every one of them, else
    'KEY from SOURCE, ...: ' for those that were set; '' when all are defaults."""
    sources = {key: source for key in keys if (source := origin(config, key)) is not None}
    if not sources:
        return ''
    if len(sources) == len(keys) and len(set(sources.values())) == 1:
        return f'{sources[keys[0]]}: '
    return ', '.join(f'{key} from {source}' for key, source in sources.items()) + ': '


def _value_error(config: CN, keys: Sequence[str], message: str) -> ConfigError:
    return ConfigError(named_origin(config, *keys) + message)


def _flatten(values: dict, prefix: str = '') -> list:
    pairs = []
    for key, value in values.items():
        name = f'{prefix}{key}'
        pairs += _flatten(value, name + '.') if isinstance(value, dict) else [(name, value)]
    return pairs


def merge_yaml(config: CN, path: str, _chain: Sequence[str] = ()) -> None:
    """Merge ``path`` (after its BASE files) into ``config``."""
    path = os.path.abspath(path)
    if path in _chain:
        raise ConfigError(f'{path}: BASE inheritance loops through {" -> ".join(_chain)}')
    values = _read_yaml(path)
    for base in _base_files(values, path):
        merge_yaml(config, base, (*_chain, path))
    for key, value in _flatten(values):
        set_value(config, key, value, path)
        if key == 'TRUST_PICKLE' and config.TRUST_PICKLE:
            raise ConfigError(f'{path}: TRUST_PICKLE is set only on the command line (-trust_pickle): a config file '
                              'cannot let weights files run code')


def merge_opts(config: CN, opts: Sequence[str]) -> None:
    """Apply ``KEY VALUE`` pairs from the command line."""
    if len(opts) % 2:
        raise ConfigError(f'-opts needs KEY VALUE pairs, got an odd number of items: {list(opts)}')
    for key, value in zip(opts[0::2], opts[1::2]):
        set_value(config, key, value, '-opts')


def validate_config(config: CN) -> None:
    """Reject values that YACS types allow but the model or trainer cannot use, naming the key and where its value
    came from (origin)."""
    for key, choices in _CHOICES.items():
        if lookup(config, key) not in choices:
            raise _value_error(config, [key], f'{key} must be one of {list(choices)}, got {lookup(config, key)!r}')
    for key in _POSITIVE:
        if not lookup(config, key) > 0:
            raise _value_error(config, [key], f'{key} must be positive, got {lookup(config, key)!r}')
    for key in _NON_NEGATIVE:
        if lookup(config, key) < 0:
            raise _value_error(config, [key], f'{key} must not be negative, got {lookup(config, key)!r}')
    if config.NGPUS == 0 or config.NGPUS < -1:
        raise _value_error(config, ['NGPUS'], f'NGPUS must be a process count of at least 1, or -1 for one process '
                                              f'per visible GPU, got {config.NGPUS}')
    if config.DATA.NUM_WORKERS < -1:
        raise _value_error(config, ['DATA.NUM_WORKERS'], f'DATA.NUM_WORKERS must be a count, or -1 for min(8, cores '
                                                         f'// processes), got {config.DATA.NUM_WORKERS!r}')
    for key in _PROBABILITIES:
        if not 0.0 <= lookup(config, key) <= 1.0:
            raise _value_error(config, [key], f'{key} must lie in [0, 1], got {lookup(config, key)!r}')
    if config.MODEL.INIT_VALUES is not None and config.MODEL.INIT_VALUES < 0:
        raise _value_error(config, ['MODEL.INIT_VALUES'], f'MODEL.INIT_VALUES must be positive (layer scale init), '
                                                          f'or 0 or null for no layer scale; got '
                                                          f'{config.MODEL.INIT_VALUES!r}')
    if config.DATA.IMAGE_SIZE % config.MODEL.PATCH_SIZE:
        raise _value_error(config, ['DATA.IMAGE_SIZE', 'MODEL.PATCH_SIZE'],
                           f'DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE} is not a multiple of MODEL.PATCH_SIZE '
                           f'{config.MODEL.PATCH_SIZE}')
    if config.MODEL.EMBED_DIM % config.MODEL.NUM_HEADS:
        raise _value_error(config, ['MODEL.EMBED_DIM', 'MODEL.NUM_HEADS'],
                           f'MODEL.EMBED_DIM {config.MODEL.EMBED_DIM} is not divisible by MODEL.NUM_HEADS '
                           f'{config.MODEL.NUM_HEADS}')
    for key, length in (('DATA.IMAGENET_MEAN', 3), ('DATA.IMAGENET_STD', 3), ('TRAIN.OPTIMIZER.BETAS', 2),
                        ('TRAIN.RRC_SCALE', 2), ('TRAIN.RRC_RATIO', 2)):
        if len(lookup(config, key)) != length:
            raise _value_error(config, [key], f'{key} needs {length} values, got {list(lookup(config, key))}')
    if config.TRAIN.CUTMIX_MINMAX and len(config.TRAIN.CUTMIX_MINMAX) != 2:
        raise _value_error(config, ['TRAIN.CUTMIX_MINMAX'], f'TRAIN.CUTMIX_MINMAX needs [min, max] or [], got '
                                                            f'{list(config.TRAIN.CUTMIX_MINMAX)}')


TOKENIZER_PATCH_PIXELS = 8  # the DALL-E encoder gives one token per 8x8 pixels; the VQ-KD one per VQKD.PATCH_SIZE
_CONVERT_TOKENIZER = {  # PRETRAIN.TOKENIZER -> how to get its weights
    'dalle': 'DALL-E tokenizer, convert its encoder with `python load_dalle_weights.py -src encoder.pkl -dst '
             'dalle_encoder.pdparams`',
    'vqkd': "VQ-KD tokenizer (PRETRAIN.TOKENIZER vqkd), convert unilm's vqkd_*.pth with load_vqkd_weights.py",
}


def _check_token_grid(config: CN, grid: int) -> None:
    """The tokenizer's grid over PRETRAIN.SECOND_INPUT_SIZE pixels must be the model's patch grid; with VQ-KD its
    codebook must be lm_head's vocabulary."""
    pretrain, vqkd = config.PRETRAIN, config.VQKD
    vqkd_keys = ['VQKD.PATCH_SIZE'] if pretrain.TOKENIZER == 'vqkd' else []
    pixels = vqkd.PATCH_SIZE if vqkd_keys else TOKENIZER_PATCH_PIXELS
    second = pretrain.SECOND_INPUT_SIZE
    if second != grid * pixels:
        raise _value_error(
            config, ['PRETRAIN.SECOND_INPUT_SIZE', 'DATA.IMAGE_SIZE', 'MODEL.PATCH_SIZE', *vqkd_keys],
            f'PRETRAIN.SECOND_INPUT_SIZE {second} gives the tokenizer {second / pixels:g} tokens per side ({pixels} px '
            f'each{", VQKD.PATCH_SIZE" if vqkd_keys else ""}), but the model has a {grid}x{grid} patch grid '
            f'(DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE} / MODEL.PATCH_SIZE {config.MODEL.PATCH_SIZE}): '
            f'use {grid * pixels}')
    if pretrain.TOKENIZER == 'vqkd' and pretrain.VOCAB_SIZE != vqkd.CODEBOOK_SIZE:
        raise _value_error(config, ['PRETRAIN.VOCAB_SIZE', 'VQKD.CODEBOOK_SIZE'],
                           f'PRETRAIN.VOCAB_SIZE {pretrain.VOCAB_SIZE} differs from VQKD.CODEBOOK_SIZE '
                           f'{vqkd.CODEBOOK_SIZE}: lm_head predicts the VQ-KD codebook\'s entries, set them equal')


def _check_cls_branch(config: CN) -> None:
    """BEiT v2's CLS branch (PRETRAIN.CLS_PT) takes the patch tokens after EARLY_LAYERS of the MODEL.DEPTH blocks.
    (HEAD_LAYERS below 1 is refused by validate_config.)"""
    early, depth = config.PRETRAIN.EARLY_LAYERS, config.MODEL.DEPTH
    if not 1 <= early <= depth:
        raise _value_error(config, ['PRETRAIN.EARLY_LAYERS', 'MODEL.DEPTH'],
                           f'PRETRAIN.EARLY_LAYERS {early} is outside [1, MODEL.DEPTH {depth}]: the CLS branch '
                           f'(PRETRAIN.CLS_PT) takes the patch tokens after that many blocks')


def validate_pretraining_config(config: CN) -> None:
    """What pre-training needs beyond validate_config: token grid = patch grid, a mask that fits, the tokenizer's
    weights (or an explicit choice of a random tokenizer), no -eval, no TO_STATIC."""
    pretrain = config.PRETRAIN
    if config.EVAL:
        raise _value_error(config, ['EVAL'], 'pre-training has no evaluation: -eval (EVAL) is for fine-tuned models '
                                             '(main_single_gpu.py)')
    if config.MODEL.TO_STATIC:
        raise _value_error(config, ['MODEL.TO_STATIC'], 'MODEL.TO_STATIC compiles the fine-tuning model only: the '
                                                        'pre-training model selects the masked patches with a '
                                                        'data-dependent shape; run pre-training in dygraph')
    grid = config.DATA.IMAGE_SIZE // config.MODEL.PATCH_SIZE
    _check_token_grid(config, grid)
    if pretrain.CLS_PT:
        _check_cls_branch(config)
    num_masked = pretrain.NUM_MASK_PATCHES
    if grid * grid < num_masked:
        raise _value_error(config, ['PRETRAIN.NUM_MASK_PATCHES', 'DATA.IMAGE_SIZE', 'MODEL.PATCH_SIZE'],
                           f'PRETRAIN.NUM_MASK_PATCHES {num_masked} is more than the {grid * grid} patches of a '
                           f'{grid}x{grid} grid')
    largest_block = min(pretrain.MAX_MASK_PATCHES_PER_BLOCK or num_masked, num_masked)
    if largest_block < pretrain.MIN_MASK_PATCHES_PER_BLOCK:
        raise _value_error(config, ['PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK', 'PRETRAIN.NUM_MASK_PATCHES',
                                    'PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK'],
                           f'PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK {pretrain.MIN_MASK_PATCHES_PER_BLOCK} is more than a '
                           f'block may hold (PRETRAIN.NUM_MASK_PATCHES {num_masked}, '
                           f'PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK {pretrain.MAX_MASK_PATCHES_PER_BLOCK})')
    if pretrain.TOKENIZER == 'dalle' and pretrain.TOKENIZER_HIDDEN % 4:
        raise _value_error(config, ['PRETRAIN.TOKENIZER_HIDDEN'],
                           f'PRETRAIN.TOKENIZER_HIDDEN must be a multiple of 4 (the DALL-E encoder\'s blocks narrow '
                           f'to a quarter of it), got {pretrain.TOKENIZER_HIDDEN}')
    if not pretrain.TOKENIZER_WEIGHTS and not pretrain.RANDOM_TOKENIZER:
        raise ConfigError(f'PRETRAIN.TOKENIZER_WEIGHTS is not set: pre-training predicts the tokens of the '
                          f'{_CONVERT_TOKENIZER[pretrain.TOKENIZER]} and give that file (PRETRAIN.RANDOM_TOKENIZER '
                          f'True runs with random tokenizer weights, for tests and demos only)')
    if pretrain.TOKENIZER_WEIGHTS and not os.path.isfile(pretrain.TOKENIZER_WEIGHTS):
        raise _value_error(config, ['PRETRAIN.TOKENIZER_WEIGHTS'],
                           f'PRETRAIN.TOKENIZER_WEIGHTS: file not found: {pretrain.TOKENIZER_WEIGHTS}')


def validate_tokenizer_training_config(config: CN) -> None:
    """What VQ-KD tokenizer training (main_tokenizer.py) needs beyond validate_config, before anything is built:
    the VQKD.* training keys in range, a patch grid, no TO_STATIC, model EMA or AMP O2, the teacher's files named and
    present (the teacher's own checks, e.g. its config and grid, are vqkd_teacher.py's)."""
    vqkd = config.VQKD
    if vqkd.TEACHER not in VQKD_TEACHERS:
        raise _value_error(config, ['VQKD.TEACHER'], f'VQKD.TEACHER must be one of {list(VQKD_TEACHERS)}, got '
                                                     f'{vqkd.TEACHER!r}')
    for key, low in (('VQKD.DECODER_DEPTH', 1), ('VQKD.KMEANS_ITERS', 0)):
        if lookup(config, key) < low:
            raise _value_error(config, [key], f'{key} must be at least {low}, got {lookup(config, key)!r}')
    if not 0.0 <= vqkd.EMA_DECAY < 1.0:
        raise _value_error(config, ['VQKD.EMA_DECAY'], f'VQKD.EMA_DECAY must lie in [0, 1), got {vqkd.EMA_DECAY!r}')
    if vqkd.BETA < 0:
        raise _value_error(config, ['VQKD.BETA'], f'VQKD.BETA must not be negative, got {vqkd.BETA!r}')
    if config.DATA.IMAGE_SIZE % vqkd.PATCH_SIZE:
        raise _value_error(config, ['DATA.IMAGE_SIZE', 'VQKD.PATCH_SIZE'],
                           f'DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE} is not a multiple of VQKD.PATCH_SIZE '
                           f'{vqkd.PATCH_SIZE}')
    if vqkd.EMBED_DIM % vqkd.NUM_HEADS:
        raise _value_error(config, ['VQKD.EMBED_DIM', 'VQKD.NUM_HEADS'],
                           f'VQKD.EMBED_DIM {vqkd.EMBED_DIM} is not divisible by VQKD.NUM_HEADS {vqkd.NUM_HEADS}')
    if config.DATA.IMAGE_CHANNELS != 3:
        raise _value_error(config, ['DATA.IMAGE_CHANNELS'], 'DATA.IMAGE_CHANNELS must be 3: the tokenizer and the '
                                                            f'teacher take RGB, got {config.DATA.IMAGE_CHANNELS}')
    for key, why in (('MODEL.TO_STATIC', 'the quantiser updates its codebook in forward: run in dygraph'),
                     ('TRAIN.MODEL_EMA', 'an EMA of the weights would average the EMA codebook too (unilm keeps '
                                         'none)')):
        if lookup(config, key):
            raise _value_error(config, [key], f'{key}: {why}; set it False')
    if config.AMP and config.AMP_LEVEL == 'O2':
        raise _value_error(config, ['AMP_LEVEL'], 'AMP_LEVEL O2 casts every floating buffer to the AMP dtype, the EMA '
                                                  'codebook and its statistics too (unilm keeps the quantiser in '
                                                  'float32): use AMP_LEVEL O1')
    check_teacher_file(config, 'VQKD.TEACHER_WEIGHTS')


def check_teacher_file(config: CN, key: str) -> None:
    """The teacher's file ``key`` is set and exists."""
    path = lookup(config, key)
    if not path:
        raise _value_error(config, [key], f'{key} is not set: tokenizer training distils the features of a frozen '
                                          f'teacher (VQKD.TEACHER {config.VQKD.TEACHER!r}) that it names')
    if not os.path.isfile(path):
        raise _value_error(config, [key], f'{key}: file not found: {path}')


def get_config(cfg_file: str | None = None) -> CN:
    """Defaults merged with ``cfg_file`` (and the files it inherits from); not frozen."""
    config = get_default_config()
    if cfg_file:
        merge_yaml(config, cfg_file)
    validate_config(config)
    return config


# What the saved tensors of a training checkpoint were built for: a resume cannot change them.
MODEL_SHAPE_KEYS = ('MODEL.PATCH_SIZE', 'MODEL.EMBED_DIM', 'MODEL.DEPTH', 'MODEL.NUM_HEADS', 'MODEL.MLP_RATIO',
                    'MODEL.QKV_BIAS', 'MODEL.USE_ABS_POS_EMB', 'MODEL.USE_REL_POS_BIAS',
                    'MODEL.USE_SHARED_REL_POS_BIAS', 'MODEL.USE_MEAN_POOLING', 'MODEL.NUM_CLASSES', 'DATA.IMAGE_SIZE',
                    'DATA.IMAGE_CHANNELS', 'PRETRAIN.VOCAB_SIZE', 'PRETRAIN.CLS_PT', 'PRETRAIN.EARLY_LAYERS',
                    'PRETRAIN.HEAD_LAYERS', 'PRETRAIN.SHARED_LM_HEAD', 'VQKD.PATCH_SIZE', 'VQKD.EMBED_DIM',
                    'VQKD.DEPTH', 'VQKD.NUM_HEADS', 'VQKD.MLP_RATIO', 'VQKD.CODEBOOK_SIZE', 'VQKD.CODEBOOK_DIM',
                    'LINPROBE.BLOCKS')
_WHERE_KEYS = ('MODEL.RESUME', 'SAVE')  # where a run reads and writes, not how it trains


def changed_settings(saved_dump: str, config: CN) -> tuple[list, list]:
    """(changed, fixed): (key, saved value, value now) of every key that ``config`` sets otherwise than the config
    dump a checkpoint holds, and those of them in MODEL_SHAPE_KEYS. Keys the dump lacks (added since) are left out."""
    saved = dict(_flatten(yaml.safe_load(saved_dump) or {}))
    now = dict(_flatten(yaml.safe_load(config.dump())))
    changed = [(key, saved[key], value) for key, value in now.items()
               if key in saved and saved[key] != value and key not in _WHERE_KEYS]
    return changed, [change for change in changed if change[0] in MODEL_SHAPE_KEYS]
