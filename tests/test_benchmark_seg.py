"""benchmark_seg: what tells a segmentation config, the batch both sides get, that transformers' loss (labels=) is
the task's on such a batch, and that both step builders run (speed is not tested)."""
import numpy as np
import paddle
import pytest
import torch

import benchmark_seg
from config import get_config, merge_opts
from helpers import ROOT, TINY_CONFIG
from seg_checkpoints import random_transformers_model
from seg_inference import settings_from_config
from task_segment import SegmentationObjective

TINY_SEG = str(ROOT / 'configs' / 'beit_tiny_seg.yaml')


def seg_config(*opts: str):
    config = get_config(TINY_SEG)
    merge_opts(config, list(opts))
    benchmark_seg.same_work(config)
    return config


@pytest.mark.parametrize('path, opts, expected', [
    (TINY_SEG, [], True),
    (str(ROOT / 'configs' / 'upernet_beit_base_640_ade20k.yaml'), [], True),
    (TINY_CONFIG, [], False),
    (TINY_CONFIG, ['SEG.NUM_CLASSES', '3'], False),  # -opts alone make no segmentor's config
])
def test_segmentation_configs_are_the_ones_whose_files_set_seg_keys(path, opts, expected):
    config = get_config(path)
    merge_opts(config, opts)
    assert benchmark_seg.is_segmentation_config(config) is expected


def test_both_sides_do_the_same_work_on_a_fully_labelled_batch():
    config = seg_config()
    assert config.MODEL.DROPPATH == 0.0 and config.SEG.DROPOUT == 0.0
    images, labels = benchmark_seg.seg_batch(config, 3)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.float32
    assert labels.shape == (3, 32, 32) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == config.SEG.NUM_CLASSES - 1  # no ignored pixel


def test_transformers_loss_is_the_tasks_on_the_benchmark_batch():
    """transformers' labels= loss (as its forward calls it, with the config transformers_config gives it) equals
    SegmentationObjective.loss for the same logits, an auxiliary weight other than transformers' default included."""
    config = seg_config('SEG.AUX_LOSS_WEIGHT', '0.3')
    _, labels = benchmark_seg.seg_batch(config, 2)
    rng = np.random.default_rng(1)
    main = rng.standard_normal((2, config.SEG.NUM_CLASSES, 8, 8)).astype(np.float32) * 3
    aux = rng.standard_normal((2, config.SEG.NUM_CLASSES, 2, 2)).astype(np.float32) * 3
    seg = config.SEG
    objective = SegmentationObjective(num_classes=seg.NUM_CLASSES, ignore_index=seg.IGNORE_INDEX,
                                      aux_weight=seg.AUX_LOSS_WEIGHT, settings=settings_from_config(config))
    ours, _ = objective.loss(paddle.to_tensor(main), paddle.to_tensor(aux), paddle.to_tensor(labels))
    reference = random_transformers_model(config)
    theirs = reference.loss_function(torch.from_numpy(main), torch.from_numpy(labels),
                                     ignore_index=reference.config.semantic_loss_ignore_index,
                                     auxiliary_logits=torch.from_numpy(aux),
                                     auxiliary_loss_weight=reference.config.auxiliary_loss_weight)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_transformers_reference_takes_unilms_blocks():
    config = seg_config()  # blocks 0-3 (0-based): transformers' hidden states 2-5
    assert random_transformers_model(config).config.out_indices == [2, 3, 4, 5]


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('side', ['dygraph', 'static', 'transformers'])
def test_step_builders_run(side, mode):
    config = seg_config()
    if side == 'transformers':
        step = benchmark_seg.transformers_seg_step(config, side, mode, 2)
    else:
        step = benchmark_seg.paddle_seg_step(config, side, mode, 2)
    step()
    step()
