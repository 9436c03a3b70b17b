"""The segmentation zoo (configs/upernet_*.yaml): each config holds the recipe of the unilm file it names, value for
value; its schedule spans unilm's 160k optimizer steps on ADE20K; its header names its unilm file, start weights and
published mIoU; and docs/recipes.md's tables list every config with the same values and commands."""
import re
import shlex
from itertools import takewhile

import pytest
from paddle.io import DistributedBatchSampler

from beit_seg import build_beit_upernet
from config import get_config, merge_opts, validate_config
from helpers import ROOT
from run_setup import steps_per_epoch
from seg_inference import settings_from_config
from task_segment import SEGMENTATION

SEG_CONFIGS = sorted(path.stem for path in (ROOT / 'configs').glob('upernet_*.yaml'))
RECIPES = ROOT / 'docs' / 'recipes.md'

# unilm's configs/beit/upernet/*.py (backbone, decode_head, optimizer, lr_config, samples_per_gpu, update_interval,
# test_cfg) with its _base_/datasets ade20k.py (512) or ade20k_640x640.py (640); the start its beit README names for
# the recipe's kind; the mIoU (single scale, multi-scale + flip) its READMEs publish, None where they publish none.
BASE = dict(dim=768, depth=12, heads=12, out_indices=[3, 5, 7, 11], init=0.1, drop_path=0.1)
LARGE = dict(dim=1024, depth=24, heads=16, out_indices=[7, 11, 15, 23], init=1e-6, drop_path=0.2)
AT_512 = dict(crop=512, scale=[2048, 512], stride=341)
AT_640 = dict(crop=640, scale=[2560, 640], stride=426)
UNILM = {
    'upernet_beit_base_512_ade20k': ('upernet_beit_base_12_512_slide_160k_ade20k_pt2ft', BASE, AT_512,
                                     dict(lr=3e-5, decay=0.9, batch=2, accum=1),
                                     'beit_base_patch16_224_pt22k_ft22k', None),
    'upernet_beit_base_512_ade20k_pt': ('upernet_beit_base_12_512_slide_160k_ade20k_pt', BASE, AT_512,
                                        dict(lr=7e-4, decay=0.65, batch=2, accum=1),
                                        'beit_base_patch16_224_pt22k', None),
    'upernet_beit_base_640_ade20k': ('upernet_beit_base_12_640_slide_160k_ade20k_pt2ft', BASE, AT_640,
                                     dict(lr=3e-5, decay=0.9, batch=2, accum=1),
                                     'beit_base_patch16_224_pt22k_ft22k', ('53.61', '54.26')),
    'upernet_beit_large_512_ade20k': ('upernet_beit_large_24_512_slide_160k_ade20k_pt2ft', LARGE, AT_512,
                                      dict(lr=2e-5, decay=0.95, batch=2, accum=1),
                                      'beit_large_patch16_224_pt22k_ft22k', None),
    # samples_per_gpu 1, update_interval 2: 320k runner iterations (3,000 of warm-up) are 160k (1,500) steps
    'upernet_beit_large_640_ade20k': ('upernet_beit_large_24_640_slide_160k_ade20k_pt2ft', LARGE, AT_640,
                                      dict(lr=2e-5, decay=0.95, batch=1, accum=2),
                                      'beit_large_patch16_224_pt22k_ft22k', ('56.7', '57.0')),
}
UNILM_STEPS, UNILM_PROCESSES, ADE20K_TRAIN_IMAGES = 160_000, 8, 20_210


def zoo_config(name):
    return get_config(str(ROOT / 'configs' / f'{name}.yaml'))


def test_the_zoo_is_unilms_released_recipes():
    """A new upernet config must be added to UNILM (and so be checked against its unilm file)."""
    assert sorted(UNILM) == SEG_CONFIGS


@pytest.mark.parametrize('name', sorted(UNILM))
def test_config_holds_its_unilm_recipe(name):
    _, model_spec, data_spec, recipe, _, _ = UNILM[name]
    config = zoo_config(name)
    validate_config(config)
    SEGMENTATION.check_config(config)
    model, train, seg, data = config.MODEL, config.TRAIN, config.SEG, config.DATA
    found = dict(name=model.NAME, dim=model.EMBED_DIM, depth=model.DEPTH, heads=model.NUM_HEADS,
                 out_indices=list(seg.OUT_INDICES), init=model.INIT_VALUES, drop_path=model.DROPPATH,
                 crop=data.IMAGE_SIZE, scale=list(seg.IMG_SCALE), stride=seg.SLIDE_STRIDE, lr=train.BASE_LR,
                 decay=train.LAYER_DECAY, batch=data.BATCH_SIZE, accum=train.ACCUM_ITER)
    assert found == dict(name=name, **model_spec, **data_spec, **recipe)
    shared = dict(patch=model.PATCH_SIZE, channels=seg.CHANNELS, abs_pos=model.USE_ABS_POS_EMB,
                  rel_pos=model.USE_REL_POS_BIAS, shared_rel_pos=model.USE_SHARED_REL_POS_BIAS,
                  wd=train.WEIGHT_DECAY, betas=list(train.OPTIMIZER.BETAS), clip=train.GRAD_CLIP,
                  scaled_lr=seg.LINEAR_SCALED_LR, warmup=seg.WARMUP_ITERS, warmup_ratio=seg.WARMUP_RATIO,
                  power=seg.POWER, amp=config.AMP, classes=seg.NUM_CLASSES, reduce_zero=seg.REDUCE_ZERO_LABEL,
                  aux=seg.AUX_CHANNELS, aux_weight=seg.AUX_LOSS_WEIGHT, pools=list(seg.POOL_SCALES),
                  ratio_range=list(seg.RATIO_RANGE), cat_max=seg.CAT_MAX_RATIO, mode=seg.TEST_MODE,
                  mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    assert shared == dict(patch=16, channels=model_spec['dim'], abs_pos=False, rel_pos=True, shared_rel_pos=False,
                          wd=0.05, betas=[0.9, 0.999], clip=0.0, scaled_lr=0, warmup=1500, warmup_ratio=1e-6,
                          power=1.0, amp=True, classes=150, reduce_zero=True, aux=256, aux_weight=0.4,
                          pools=[1, 2, 3, 6], ratio_range=[0.5, 2.0], cat_max=0.75, mode='slide',
                          mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def unilm_epoch_steps(config) -> int:
    """Optimizer steps of an ADE20K epoch on unilm's 8 processes, as the job counts them (the training sampler)."""
    sampler = DistributedBatchSampler(range(ADE20K_TRAIN_IMAGES), config.DATA.BATCH_SIZE,
                                      num_replicas=UNILM_PROCESSES, rank=UNILM_PROCESSES - 1, shuffle=True,
                                      drop_last=True)
    return steps_per_epoch(config, sampler)


@pytest.mark.parametrize('name', sorted(UNILM))
def test_schedule_spans_unilms_160k_steps_of_16_images(name):
    config = zoo_config(name)
    steps = unilm_epoch_steps(config)
    assert UNILM_PROCESSES * config.DATA.BATCH_SIZE * config.TRAIN.ACCUM_ITER == 16
    assert abs(config.TRAIN.NUM_EPOCHS * steps - UNILM_STEPS) < steps
    assert config.VALIDATE_FREQ * steps == pytest.approx(16_000, rel=0.05)  # unilm's evaluation interval


def header(name) -> str:
    """The config file's leading comment as one line."""
    lines = (ROOT / 'configs' / f'{name}.yaml').read_text().splitlines()
    return ' '.join(line[1:].strip() for line in takewhile(lambda line: line.startswith('#'), lines))


@pytest.mark.parametrize('name', sorted(UNILM))
def test_header_names_its_unilm_file_start_and_published_miou(name):
    unilm_file, _, _, _, start, published = UNILM[name]
    text = header(name)
    assert f"unilm's {unilm_file}" in text
    assert f'-pretrained {start}.pdparams' in text
    if published:
        assert f'Published: {published[0]} mIoU single scale, {published[1]} multi-scale + flip' in text
    else:
        assert 'Published: no mIoU' in text


def markdown_table(text: str, header_start: str) -> dict:
    """The rows (lists of cells, backticks removed) of the table whose header line starts with ``header_start``,
    by the config name of their first cell."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith('|'):
            break
        cells = [cell.strip().strip('`') for cell in line.strip('|').split('|')]
        rows[re.fullmatch(r'configs/(\w+)\.yaml', cells[0]).group(1)] = cells
    return rows


def test_recipes_table_lists_every_seg_config_with_its_values():
    rows = markdown_table(RECIPES.read_text(), '| config | unilm config |')
    assert sorted(rows) == SEG_CONFIGS
    for name, cells in rows.items():
        unilm_file, _, _, _, start, published = UNILM[name]
        config = zoo_config(name)
        train, steps = config.TRAIN, unilm_epoch_steps(config)
        batch = f'{UNILM_PROCESSES} x {config.DATA.BATCH_SIZE}' + (f' x {train.ACCUM_ITER}' if train.ACCUM_ITER > 1
                                                                    else '')
        expected = [f'configs/{name}.yaml', f'{unilm_file}.py', start, str(config.DATA.IMAGE_SIZE),
                    f'{train.NUM_EPOCHS} x {steps:,} = {train.NUM_EPOCHS * steps:,}', train.BASE_LR,
                    train.LAYER_DECAY, config.MODEL.DROPPATH, batch]
        found = cells[:5] + [float(cell) for cell in cells[5:8]] + [cells[8]]
        assert found == expected, name
        assert cells[10] == (' / '.join(published) if published else 'not published'), name


def test_recipes_commands_train_each_config_from_its_start_and_evaluate_it():
    text = RECIPES.read_text()
    rows = markdown_table(text, '| config | train |')
    assert sorted(rows) == SEG_CONFIGS
    for name, (_, train, evaluate) in rows.items():
        data = '-data_path /dataset/ADEChallengeData2016'
        assert train.startswith(f'python main_segment.py -cfg configs/{name}.yaml {data} '
                                f'-pretrained {UNILM[name][4]}.pdparams -ngpus 8 -output '), name
        assert evaluate == f'python main_segment.py -cfg configs/{name}.yaml {data} -pretrained SEG.pdparams -eval'


def test_the_documented_multi_scale_flip_opts_set_unilms_ms_evaluation():
    """The -opts that recipes.md and the headers give, split as a shell splits them, load and mean unilm's _ms."""
    documented = re.search(r"`(-opts SEG\.MS_RATIOS [^`]+)`", RECIPES.read_text()).group(1)
    assert all(documented in header(name) for name in SEG_CONFIGS)
    config = zoo_config('upernet_beit_base_512_ade20k')
    merge_opts(config, shlex.split(documented)[1:])
    settings = settings_from_config(config)
    assert (settings.ratios, settings.flip, settings.setr_multi_scale) == ((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True,
                                                                           True)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(UNILM))
def test_model_builds_at_its_crop_with_the_tabled_parameter_count(name):
    """The full-size model (seconds, up to 2 GB for BEiT-L): per-block bias tables for the crop's grid, and the
    parameter count recipes.md states (the 640 crop's: unilm's 163M and 441M)."""
    config = zoo_config(name)
    model = build_beit_upernet(config)
    grid = config.DATA.IMAGE_SIZE // config.MODEL.PATCH_SIZE
    table = model.backbone.blocks[0].attn.relative_position_bias_table
    assert list(table.shape) == [(2 * grid - 1) ** 2 + 3, config.MODEL.NUM_HEADS]
    count = sum(int(parameter.numel()) for parameter in model.parameters())
    cells = markdown_table(RECIPES.read_text(), '| config | unilm config |')[name]
    assert count == int(cells[9].replace(',', ''))
    if UNILM[name][5]:
        assert round(count / 1e6) == {768: 163, 1024: 441}[config.MODEL.EMBED_DIM]  # unilm's beit README
