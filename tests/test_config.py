"""Config: YAML files with BASE inheritance, command-line flags, clear errors, and no key that nothing reads."""
import ast
import glob
import re

import pytest
from yacs.config import CfgNode

from cli import update_config
from config import ConfigError, get_config, origin, validate_config, validate_pretraining_config
from helpers import ROOT, TINY_CONFIG
from test_cli import parse

CONFIGS = sorted(glob.glob(str(ROOT / 'configs' / '*.yaml')))


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('cfg_file', CONFIGS, ids=lambda p: p.rsplit('/', 1)[-1])
def test_every_shipped_config_loads(cfg_file):
    config = get_config(cfg_file)
    assert cfg_file.rsplit('/', 1)[-1][:-len('.yaml')].replace('_from_pt22k', '') == config.MODEL.NAME
    assert config.DATA.BATCH_SIZE_EVAL > 0 and config.DATA.BATCH_SIZE > 0


V1_NORMALISATION = ([0.5] * 3, [0.5] * 3)
IMAGENET_NORMALISATION = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # BEiT v2 (unilm, timm)
# unilm's fine-tuning recipes: (LR, the total batch it is the LR of, weight decay, epochs, warm-up epochs)
V1_FT22K_TO_1K = (2e-5, 512, 1e-8, 30, 5)
V2_BATCH, V2_WD = 1024, 0.05


@pytest.mark.parametrize('name, size, crop, dim, depth, decay, drop_path, normalisation, recipe', [
    ('beit_base_patch16_224', 224, 0.9, 768, 12, 0.85, 0.1, V1_NORMALISATION, V1_FT22K_TO_1K),
    ('beit_base_patch16_384', 384, 1.0, 768, 12, 0.85, 0.1, V1_NORMALISATION, V1_FT22K_TO_1K),
    ('beit_large_patch16_224', 224, 0.9, 1024, 24, 0.9, 0.4, V1_NORMALISATION, V1_FT22K_TO_1K),
    ('beit_large_patch16_384', 384, 1.0, 1024, 24, 0.9, 0.4, V1_NORMALISATION, V1_FT22K_TO_1K),
    ('beit_large_patch16_512', 512, 1.0, 1024, 24, 0.9, 0.4, V1_NORMALISATION, V1_FT22K_TO_1K),
    ('beitv2_base_patch16_224_pt1k_ft1k', 224, 0.9, 768, 12, 0.6, 0.2, IMAGENET_NORMALISATION,
     (5e-4, V2_BATCH, V2_WD, 100, 20)),
    ('beitv2_base_patch16_224_pt1k_ft21kto1k', 224, 0.9, 768, 12, 0.75, 0.1, IMAGENET_NORMALISATION,
     (5e-5, V2_BATCH, V2_WD, 30, 20)),
    ('beitv2_large_patch16_224_pt1k_ft1k', 224, 0.95, 1024, 24, 0.8, 0.2, IMAGENET_NORMALISATION,
     (2e-4, V2_BATCH, V2_WD, 50, 5)),
    ('beitv2_large_patch16_224_pt1k_ft21kto1k', 224, 0.95, 1024, 24, 0.8, 0.25, IMAGENET_NORMALISATION,
     (7e-5, V2_BATCH, V2_WD, 20, 5)),
])
def test_zoo_configs_hold_the_official_settings(name, size, crop, dim, depth, decay, drop_path, normalisation,
                                                recipe):
    """Crop as timm evaluates the weights (tests/test_transforms.py checks the whole eval transform)."""
    config = get_config(str(ROOT / 'configs' / f'{name}.yaml'))
    train = config.TRAIN
    assert (size, crop) == (config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT)
    assert (dim, depth, 16) == (config.MODEL.EMBED_DIM, config.MODEL.DEPTH, config.MODEL.PATCH_SIZE)
    assert config.MODEL.USE_MEAN_POOLING and config.MODEL.USE_REL_POS_BIAS and not config.MODEL.USE_ABS_POS_EMB
    assert config.DATA.INTERPOLATION == 'bicubic'
    assert normalisation == (config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)
    assert (decay, drop_path) == (train.LAYER_DECAY, config.MODEL.DROPPATH)
    assert recipe == (train.BASE_LR, train.LINEAR_SCALED_LR, train.WEIGHT_DECAY, train.NUM_EPOCHS, train.WARMUP_EPOCHS)
    assert (0.1 if dim == 768 else 1e-5) == config.MODEL.INIT_VALUES


@pytest.mark.parametrize('name, mixup_cutmix', [
    ('beitv2_base_patch16_224_pt1k_ft1k', (0.8, 1.0)),
    ('beitv2_base_patch16_224_pt1k_ft21kto1k', (0.0, 0.0)),
    ('beitv2_large_patch16_224_pt1k_ft1k', (0.8, 1.0)),
    ('beitv2_large_patch16_224_pt1k_ft21kto1k', (0.0, 0.0)),
])
def test_beitv2_recipes_mix_only_from_the_pre_training(name, mixup_cutmix):
    """unilm beit2: mixup 0.8 / cutmix 1.0 fine-tuning the pre-training, neither after the 21k intermediate
    fine-tuning; its other defaults (smoothing, RandAugment, erasing, no clipping, no EMA) in every recipe."""
    train = get_config(str(ROOT / 'configs' / f'{name}.yaml')).TRAIN
    assert mixup_cutmix == (train.MIXUP_ALPHA, train.CUTMIX_ALPHA)
    assert (train.SMOOTHING, train.RAND_AUGMENT, train.RAND_AUGMENT_CONFIG) == (0.1, True, 'rand-m9-mstd0.5-inc1')
    assert (train.RANDOM_ERASE_PROB, train.GRAD_CLIP, train.MODEL_EMA) == (0.25, 0.0, False)
    assert (train.WARMUP_START_LR, train.END_LR) == (1e-6, 1e-6)


def test_base_inheritance_chain(tmp_path):
    write(tmp_path / 'grand.yaml', 'MODEL:\n  DEPTH: 6\n  EMBED_DIM: 384\nTRAIN:\n  BASE_LR: 0.1\n')
    write(tmp_path / 'parent.yaml', 'BASE: grand.yaml\nMODEL:\n  DEPTH: 8\n')
    child = write(tmp_path / 'child.yaml', "BASE: ['parent.yaml']\nTRAIN:\n  BASE_LR: 1e-3\n")
    config = get_config(child)
    assert (config.MODEL.DEPTH, config.MODEL.EMBED_DIM, config.TRAIN.BASE_LR) == (8, 384, 1e-3)


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / 'a.yaml', 'BASE: b.yaml\n')
    write(tmp_path / 'b.yaml', 'BASE: a.yaml\n')
    with pytest.raises(ConfigError, match='loops'):
        get_config(str(tmp_path / 'a.yaml'))


@pytest.mark.parametrize('yaml_text, message', [
    ('MODEL:\n  DEPHT: 12\n', 'unknown config key MODEL.DEPHT'),
    ('MODELS:\n  DEPTH: 12\n', 'unknown config key MODELS.DEPTH'),
    ('MODEL:\n  DEPTH: twelve\n', "MODEL.DEPTH expects a int like 12, got 'twelve'"),
    ('MODEL:\n  DEPTH: 12.5\n', 'MODEL.DEPTH expects a int'),
    ('MODEL:\n  USE_MEAN_POOLING: 1\n', 'MODEL.USE_MEAN_POOLING expects a bool'),
    ('DATA:\n  IMAGE_SIZE: null\n', 'DATA.IMAGE_SIZE expects a int'),
    ('MODEL: 3\n', 'MODEL is a group of keys'),
    ('DATA:\n  MODEL:\n    X: 1\n', 'unknown config key DATA.MODEL.X'),
    ('- a\n- b\n', 'expected a mapping'),
    ('MODEL: [unclosed\n', 'not valid YAML'),
])
def test_bad_yaml_names_file_and_key(tmp_path, yaml_text, message):
    path = write(tmp_path / 'bad.yaml', yaml_text)
    with pytest.raises(ConfigError) as err:
        get_config(path)
    assert message in str(err.value) and 'bad.yaml' in str(err.value)


@pytest.mark.parametrize('yaml_text, key', [
    ('MODEL:\n  TYPE: BEiT\n', 'MODEL.TYPE'),
    ('TRAIN:\n  OPTIMIZER:\n    NAME: AdamW\n', 'TRAIN.OPTIMIZER.NAME'),
])
def test_an_old_file_with_a_removed_key_names_the_file_and_the_key(tmp_path, yaml_text, key):
    path = write(tmp_path / 'old.yaml', yaml_text)
    for load in (lambda: get_config(path), lambda: update_config(get_config(), parse('-cfg', path))):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value).startswith(f'{path}: unknown config key {key} (removed: ')
    with pytest.raises(ConfigError, match=re.escape(f'-opts: unknown config key {key} (removed: ')):
        update_config(get_config(), parse('-opts', key, 'AdamW'))


@pytest.mark.parametrize('yaml_text, message', [
    ('TRAIN:\n  MIXUP_MODE: pairs\n', "TRAIN.MIXUP_MODE must be one of ['batch', 'pair', 'elem']"),
    ('DATA:\n  IMAGE_SIZE: 100\n', 'not a multiple of MODEL.PATCH_SIZE'),
    ('MODEL:\n  NUM_HEADS: 5\n', 'not divisible by MODEL.NUM_HEADS'),
    ('MODEL:\n  DROPPATH: 1.5\n', 'MODEL.DROPPATH must lie in [0, 1]'),
    ('DATA:\n  BATCH_SIZE_EVAL: 0\n', 'DATA.BATCH_SIZE_EVAL must be positive'),
    ('TRAIN:\n  OPTIMIZER:\n    BETAS: [0.9]\n', 'TRAIN.OPTIMIZER.BETAS needs 2 values'),
    ('DATA:\n  NUM_WORKERS: -2\n', 'DATA.NUM_WORKERS must be a count, or -1 for min(8, cores // processes)'),
])
def test_unusable_values_name_the_key(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError) as err:
        get_config(write(tmp_path / 'bad.yaml', yaml_text))
    assert message in str(err.value)


@pytest.mark.parametrize('yaml_text, message', [
    ('TRAIN:\n  MIXUP_MODE: pairs\n', "TRAIN.MIXUP_MODE must be one of ['batch', 'pair', 'elem'], got 'pairs'"),
    ('DATA:\n  BATCH_SIZE_EVAL: 0\n', 'DATA.BATCH_SIZE_EVAL must be positive, got 0'),
    ('TRAIN:\n  BASE_LR: -1\n', 'TRAIN.BASE_LR must not be negative, got -1.0'),
    ('NGPUS: 0\n', 'NGPUS must be a process count of at least 1'),
    ('DATA:\n  NUM_WORKERS: -2\n', 'DATA.NUM_WORKERS must be a count'),
    ('MODEL:\n  DROPPATH: 1.5\n', 'MODEL.DROPPATH must lie in [0, 1], got 1.5'),
    ('MODEL:\n  INIT_VALUES: -0.1\n', 'MODEL.INIT_VALUES must be positive'),
    ('TRAIN:\n  RRC_SCALE: [0.5]\n', 'TRAIN.RRC_SCALE needs 2 values, got [0.5]'),
    ('TRAIN:\n  CUTMIX_MINMAX: [0.5]\n', 'TRAIN.CUTMIX_MINMAX needs [min, max] or []'),
    ('MODEL:\n  PATCH_SIZE: 16\n  EMBED_DIM: 96\nDATA:\n  IMAGE_SIZE: 100\n',
     'DATA.IMAGE_SIZE 100 is not a multiple of MODEL.PATCH_SIZE 16'),
])
def test_an_unusable_value_of_a_file_names_the_file_and_the_key(tmp_path, yaml_text, message):
    """The README's promise: the file, then the key (and through -cfg as through get_config)."""
    path = write(tmp_path / 'bad.yaml', yaml_text)
    for load in (lambda: get_config(path), lambda: update_config(get_config(), parse('-cfg', path))):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value).startswith(f'{path}: {message}')


def test_an_inherited_value_names_the_base_file_that_set_it(tmp_path):
    base = write(tmp_path / 'base.yaml', 'MODEL:\n  DROPPATH: 2.0\n  NUM_HEADS: 5\n')
    child = write(tmp_path / 'child.yaml', 'BASE: base.yaml\nMODEL:\n  NUM_HEADS: 3\n')
    with pytest.raises(ConfigError, match=re.escape(f'{base}: MODEL.DROPPATH must lie in [0, 1], got 2.0')):
        get_config(child)
    write(tmp_path / 'child.yaml', 'BASE: base.yaml\nMODEL:\n  DROPPATH: 0.0\n')
    with pytest.raises(ConfigError, match=re.escape('MODEL.NUM_HEADS from ' + base + ': MODEL.EMBED_DIM 768 is not '
                                                    'divisible by MODEL.NUM_HEADS 5')):
        get_config(child)  # EMBED_DIM is the default's: only NUM_HEADS is named by its file


@pytest.mark.parametrize('argv, message', [
    (['-opts', 'TRAIN.SMOOTHING', '1.5'], '-opts: TRAIN.SMOOTHING must lie in [0, 1], got 1.5'),
    (['-batch_size', '0'], '-batch_size: DATA.BATCH_SIZE must be positive, got 0'),
    (['-cfg', TINY_CONFIG, '-opts', 'MODEL.DROPPATH', '2'], '-opts: MODEL.DROPPATH must lie in [0, 1], got 2.0'),
    (['-cfg', TINY_CONFIG, '-image_size', '30'], f'DATA.IMAGE_SIZE from -image_size, MODEL.PATCH_SIZE from '
                                                 f'{TINY_CONFIG}: DATA.IMAGE_SIZE 30 is not a multiple of '
                                                 f'MODEL.PATCH_SIZE 4'),
    (['-cfg', TINY_CONFIG, '-opts', 'DATA.IMAGE_SIZE', '30', 'MODEL.PATCH_SIZE', '7'],
     '-opts: DATA.IMAGE_SIZE 30 is not a multiple of MODEL.PATCH_SIZE 7'),
])
def test_an_unusable_value_of_a_flag_or_opts_names_it(argv, message):
    """The last to set a value is named: -opts over the file, a flag over the file."""
    with pytest.raises(ConfigError) as err:
        update_config(get_config(), parse(*argv))
    assert str(err.value) == message


def test_a_value_changed_by_code_names_no_source(tmp_path):
    config = get_config(write(tmp_path / 'ok.yaml', 'DATA:\n  BATCH_SIZE: 8\n'))
    assert origin(config, 'DATA.BATCH_SIZE') == str(tmp_path / 'ok.yaml') and origin(config, 'SEED') is None
    config.DATA.BATCH_SIZE = 0  # as a test or a script may: the file did not say 0
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value) == 'DATA.BATCH_SIZE must be positive, got 0'
    assert origin(config.clone(), 'DATA.BATCH_SIZE') is None


def test_an_unusable_pretraining_value_names_where_it_came_from(tmp_path):
    path = write(tmp_path / 'pretrain.yaml', 'PRETRAIN:\n  TOKENIZER_HIDDEN: 6\n  RANDOM_TOKENIZER: true\n')
    with pytest.raises(ConfigError, match=re.escape(f'{path}: PRETRAIN.TOKENIZER_HIDDEN must be a multiple of 4')):
        validate_pretraining_config(update_config(get_config(), parse('-cfg', path)))
    config = update_config(get_config(), parse('-cfg', path, '-opts', 'PRETRAIN.TOKENIZER_HIDDEN', '8',
                                               'PRETRAIN.NUM_MASK_PATCHES', '197'))
    with pytest.raises(ConfigError, match=re.escape('PRETRAIN.NUM_MASK_PATCHES from -opts: PRETRAIN.NUM_MASK_PATCHES '
                                                    '197 is more than the 196 patches')):
        validate_pretraining_config(config)


def test_integers_are_accepted_for_floats(tmp_path):
    config = get_config(write(tmp_path / 'ints.yaml', 'TRAIN:\n  WEIGHT_DECAY: 0\n  BASE_LR: 1\n'))
    assert config.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(config.TRAIN.WEIGHT_DECAY, float)


def test_pretraining_config_holds_unilms_pt22k_recipe(tmp_path):
    config = get_config(str(ROOT / 'configs' / 'beit_base_patch16_224_pt22k.yaml'))
    model, train, pretrain = config.MODEL, config.TRAIN, config.PRETRAIN
    assert (model.USE_SHARED_REL_POS_BIAS, model.USE_REL_POS_BIAS, model.USE_ABS_POS_EMB) == (True, False, False)
    assert (model.INIT_VALUES, model.DROPPATH, model.QKV_BIAS, model.DEPTH) == (0.1, 0.1, True, 12)
    assert (pretrain.VOCAB_SIZE, pretrain.SECOND_INPUT_SIZE, pretrain.SECOND_INTERPOLATION) == (8192, 112, 'lanczos')
    assert (pretrain.NUM_MASK_PATCHES, pretrain.MIN_MASK_PATCHES_PER_BLOCK) == (75, 16)
    assert (train.BASE_LR, train.LINEAR_SCALED_LR, train.WARMUP_EPOCHS, train.NUM_EPOCHS) == (1.5e-3, 2048, 10, 150)
    assert (train.WEIGHT_DECAY, train.GRAD_CLIP, train.LAYER_DECAY, train.OPTIMIZER.BETAS) == (0.05, 3.0, 1.0,
                                                                                              [0.9, 0.999])
    assert (train.RRC_SCALE, train.HFLIP_PROB, train.RAND_AUGMENT, train.COLOR_JITTER) == ([0.08, 1.0], 0.5, False,
                                                                                          0.4)
    assert config.DATA.IMAGENET_MEAN == config.DATA.IMAGENET_STD == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match='PRETRAIN.TOKENIZER_WEIGHTS is not set: .*load_dalle_weights.py'):
        validate_pretraining_config(config)  # no random tokenizer in the real recipe
    config.PRETRAIN.TOKENIZER_WEIGHTS = write(tmp_path / 'dalle_encoder.pdparams', 'weights')
    validate_pretraining_config(config)
    validate_pretraining_config(get_config(str(ROOT / 'configs' / 'beit_tiny_pretrain_fashion_mnist.yaml')))


@pytest.mark.parametrize('opts, message', [
    (['PRETRAIN.SECOND_INPUT_SIZE', '96'], 'PRETRAIN.SECOND_INPUT_SIZE 96 gives the tokenizer 12 tokens per side '
                                           '(8 px each), but the model has a 14x14 patch grid (DATA.IMAGE_SIZE 224 / '
                                           'MODEL.PATCH_SIZE 16): use 112'),
    (['DATA.IMAGE_SIZE', '384'], 'model has a 24x24 patch grid'),
    (['PRETRAIN.NUM_MASK_PATCHES', '197'], 'PRETRAIN.NUM_MASK_PATCHES 197 is more than the 196 patches'),
    (['PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK', '80'], 'PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK 80 is more than a block'),
    (['PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK', '10'], 'PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK 16 is more than a block'),
    (['PRETRAIN.TOKENIZER_WEIGHTS', 'missing/dall_e.pdparams'],
     'PRETRAIN.TOKENIZER_WEIGHTS: file not found: missing/dall_e.pdparams'),
    (['PRETRAIN.TOKENIZER_HIDDEN', '6'], 'PRETRAIN.TOKENIZER_HIDDEN must be a multiple of 4'),
    (['EVAL', 'True'], 'pre-training has no evaluation'),
    (['MODEL.TO_STATIC', 'True'], 'MODEL.TO_STATIC compiles the fine-tuning model only'),
])
def test_unusable_pretraining_values_name_the_key(opts, message):
    config = update_config(get_config(), parse('-cfg', str(ROOT / 'configs' / 'beit_base_patch16_224_pt22k.yaml'),
                                               '-opts', 'PRETRAIN.RANDOM_TOKENIZER', 'True', *opts))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_pretraining_config(config)


V2_PRETRAIN = str(ROOT / 'configs' / 'beitv2_base_patch16_224_pt1k.yaml')


@pytest.mark.parametrize('opts, message', [
    (['PRETRAIN.EARLY_LAYERS', '13'], 'PRETRAIN.EARLY_LAYERS 13 is outside [1, MODEL.DEPTH 12]: the CLS branch'),
    (['PRETRAIN.EARLY_LAYERS', '0'], 'PRETRAIN.EARLY_LAYERS must be positive, got 0'),
    (['MODEL.DEPTH', '8'], 'PRETRAIN.EARLY_LAYERS 9 is outside [1, MODEL.DEPTH 8]'),
    (['PRETRAIN.HEAD_LAYERS', '0'], 'PRETRAIN.HEAD_LAYERS must be positive, got 0'),
    (['PRETRAIN.VOCAB_SIZE', '8000'], 'PRETRAIN.VOCAB_SIZE 8000 differs from VQKD.CODEBOOK_SIZE 8192'),
    (['VQKD.CODEBOOK_SIZE', '1024'], 'PRETRAIN.VOCAB_SIZE 8192 differs from VQKD.CODEBOOK_SIZE 1024'),
    (['PRETRAIN.SECOND_INPUT_SIZE', '112'], 'PRETRAIN.SECOND_INPUT_SIZE 112 gives the tokenizer 7 tokens per side '
                                            '(16 px each, VQKD.PATCH_SIZE), but the model has a 14x14 patch grid '
                                            '(DATA.IMAGE_SIZE 224 / MODEL.PATCH_SIZE 16): use 224'),
    (['VQKD.PATCH_SIZE', '8'], 'PRETRAIN.SECOND_INPUT_SIZE 224 gives the tokenizer 28 tokens per side (8 px each, '
                               'VQKD.PATCH_SIZE), but the model has a 14x14 patch grid'),
    (['PRETRAIN.RANDOM_TOKENIZER', 'False'], 'PRETRAIN.TOKENIZER_WEIGHTS is not set: pre-training predicts the tokens '
                                             'of the VQ-KD tokenizer (PRETRAIN.TOKENIZER vqkd), convert unilm\'s '
                                             'vqkd_*.pth with load_vqkd_weights.py'),
])
def test_unusable_v2_pretraining_values_name_the_keys(opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_pretraining_config(update_config(get_config(), parse(
            '-cfg', V2_PRETRAIN, '-opts', 'PRETRAIN.RANDOM_TOKENIZER', 'True', *opts)))


@pytest.mark.parametrize('opts', [
    ['PRETRAIN.CLS_PT', 'False', 'PRETRAIN.EARLY_LAYERS', '30'],  # v1's model: no CLS branch to take them
    ['PRETRAIN.TOKENIZER_HIDDEN', '6'],  # a DALL-E setting, unused with VQ-KD
    ['PRETRAIN.TOKENIZER', 'dalle', 'PRETRAIN.SECOND_INPUT_SIZE', '112', 'PRETRAIN.VOCAB_SIZE', '4096'],  # v2 + DALL-E
])
def test_v2_pretraining_values_that_do_not_apply_are_not_refused(opts):
    validate_pretraining_config(update_config(get_config(), parse(
        '-cfg', V2_PRETRAIN, '-opts', 'PRETRAIN.RANDOM_TOKENIZER', 'True', *opts)))


def test_fine_tuning_configs_need_no_pretraining_values():
    """The grid check is pre-training's: a 384 px fine-tuning config keeps the 112 px default."""
    config = get_config(str(ROOT / 'configs' / 'beit_base_patch16_384.yaml'))
    assert config.PRETRAIN.SECOND_INPUT_SIZE == 112
    with pytest.raises(ConfigError, match='PRETRAIN.VOCAB_SIZE must be positive'):
        update_config(get_config(), parse('-opts', 'PRETRAIN.VOCAB_SIZE', '0'))


# ---- every key is read ------------------------------------------------------------------------------------------

# Keys read only by config.py, which is not scanned: its checks of a key's own value are not uses.
READ_BY_CONFIG = {
    'PRETRAIN.RANDOM_TOKENIZER',  # validate_pretraining_config: lets pre-training run without TOKENIZER_WEIGHTS
}


def leaf_keys(node: CfgNode, prefix: str = '') -> set:
    return {key for name, value in node.items()
            for key in (leaf_keys(value, f'{prefix}{name}.') if isinstance(value, CfgNode) else [prefix + name])}


def group_keys(node: CfgNode, prefix: str = '') -> set:
    return {key for name, value in node.items() if isinstance(value, CfgNode)
            for key in {prefix + name} | group_keys(value, f'{prefix}{name}.')}


def key_path(node: ast.expr, aliases: dict) -> str:
    """The dotted key an expression names: ``config.TRAIN.OPTIMIZER.EPS`` and, after ``train = config.TRAIN``,
    ``train.OPTIMIZER['EPS']`` both give TRAIN.OPTIMIZER.EPS (config keys are the upper-case attributes)."""
    names = []
    while True:
        if isinstance(node, ast.Attribute) and node.attr.isupper():
            names.append(node.attr)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(
                node.slice.value, str):
            names.append(node.slice.value)
        else:
            break
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        names.append(aliases[node.id])
    return '.'.join(reversed(names))


def assigned_pairs(node: ast.Assign) -> list:
    """(target, value) of ``a = x`` and of each position of ``a, b = x, y``."""
    pairs = [(target, node.value) for target in node.targets]
    if isinstance(node.value, ast.Tuple):
        pairs += [pair for target in node.targets if isinstance(target, ast.Tuple)
                  for pair in zip(target.elts, node.value.elts)]
    return pairs


def keys_read(source: str, groups: set) -> set:
    """Dotted names a module loads: attribute and subscript chains (through variables holding a group), and
    strings that are a whole dotted key (lists of keys read by name, as inference.py's). Assignments are not reads;
    a key inside a message or comment is not a read either."""
    aliases, found = {}, set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target, value in assigned_pairs(node):
                if isinstance(target, ast.Name) and key_path(value, aliases) in groups:
                    aliases[target.id] = key_path(value, aliases)
        elif isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Load):
            found.add(key_path(node, aliases))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


@pytest.mark.parametrize('source, read', [
    ('config.TRAIN.OPTIMIZER.EPS', True),
    ('train = config.TRAIN\ntrain.OPTIMIZER.EPS', True),
    ('opt = cfg.TRAIN.OPTIMIZER\nopt["EPS"]', True),
    ('KEYS = ("TRAIN.OPTIMIZER.EPS",)', True),
    ('config.TRAIN.OPTIMIZER.EPS = 1.0', False),
    ('other.OPTIMIZER.EPS', False),
    ('raise ValueError("TRAIN.OPTIMIZER.EPS must be positive")  # config.TRAIN.OPTIMIZER.EPS', False),
])
def test_the_key_scan_counts_reads_only(source, read):
    assert ('TRAIN.OPTIMIZER.EPS' in keys_read(source, {'TRAIN', 'TRAIN.OPTIMIZER'})) == read


def test_every_config_key_is_read_by_some_module():
    """A key nothing reads is a setting that silently does nothing: every default key must be read by a module
    of the project (config.py and the tests aside), or be one of READ_BY_CONFIG, which must hold no other key."""
    defaults = get_config()
    groups = group_keys(defaults)
    read = set()
    for path in sorted(ROOT.glob('*.py')):
        if path.name != 'config.py':
            read |= keys_read(path.read_text(encoding='utf-8'), groups)
    assert leaf_keys(defaults) - read == READ_BY_CONFIG
