"""export_model.py: any config exports with a dynamic batch, runs in paddle.inference as in dygraph, traces the same
program on any device, fails clearly."""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

import beit
import export_model
import inference
from beit_seg import build_beit_upernet
from config import get_config
from export_model import main
from helpers import ROOT, TINY_CONFIG, photo_batch, tiny_config
from inference import DygraphPredictor, ExportedPredictor, WeightsError, load_model
from tiny_weights import save_weights, trained_like_seg_state, trained_like_state

TOLERANCE = 1e-4  # fp32, max abs logit difference
SEG_CONFIG = str(ROOT / 'configs' / 'beit_tiny_seg.yaml')


def export(tmp_path, weights: str, *extra) -> str:
    prefix = str(tmp_path / 'exported' / 'model')
    assert main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', prefix, *extra]) == 0
    return prefix


@pytest.mark.parametrize('opts', [
    [],
    ['MODEL.USE_MEAN_POOLING', 'False', 'MODEL.INIT_VALUES', 'null'],
    ['MODEL.USE_ABS_POS_EMB', 'True', 'MODEL.USE_REL_POS_BIAS', 'False', 'MODEL.NUM_CLASSES', '3'],
])
def test_exported_model_matches_dygraph_for_any_batch_size(tmp_path, photo_paths, opts):
    config = tiny_config(*opts)
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(config))
    prefix = export(tmp_path, weights, *(['-opts', *opts] if opts else []))
    model, _ = load_model(config, weights)
    dygraph, exported = DygraphPredictor(model), ExportedPredictor(prefix)
    images = photo_batch(photo_paths, config)
    for batch in (images[:1], images[:3], images):
        expected = dygraph(batch)
        assert expected.shape == (len(batch), config.MODEL.NUM_CLASSES)
        np.testing.assert_allclose(exported(batch), expected, rtol=0, atol=TOLERANCE)


def test_export_writes_its_config_for_the_preprocessing(tmp_path):
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    prefix = export(tmp_path, weights, '-image_size', '48')
    for suffix in ('.json', '.pdiparams', '.yaml'):
        assert (tmp_path / 'exported' / f'model{suffix}').is_file()
    written = get_config(prefix + '.yaml')
    assert written.DATA.IMAGE_SIZE == 48 and written.DATA.CROP_PCT == 1.0 and written.MODEL.DEPTH == 4
    assert ExportedPredictor(prefix)(np.zeros((2, 3, 48, 48), np.float32)).shape == (2, 10)


def test_ema_weights_are_exported_on_request(tmp_path, photo_paths):
    config = tiny_config()
    ema_state = trained_like_state(config, seed=2)
    checkpoint = save_weights(tmp_path / 'checkpoint.pdparams', trained_like_state(config, seed=1), ema_state)
    images = photo_batch(photo_paths, config)
    exported = ExportedPredictor(export(tmp_path, checkpoint, '-ema'))(images)
    ema_model, _ = load_model(config, save_weights(tmp_path / 'ema.pdparams', ema_state))
    np.testing.assert_allclose(exported, DygraphPredictor(ema_model)(images), rtol=0, atol=TOLERANCE)


def test_block_features_export_matches_dygraph_for_any_batch_size(tmp_path, photo_paths):
    """-block_features: a backbone program with one [B, D, S/p, S/p] output per block, the dygraph maps for any
    batch; as a classifier (predict.py) it is refused, not read as logits."""
    config = tiny_config()
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(config))
    exported = ExportedPredictor(export(tmp_path, weights, '-block_features', '-1', '1'))
    model, _ = load_model(config, weights)
    images = photo_batch(photo_paths, config)
    for batch in (images[:1], images[:3]):
        with paddle.no_grad():
            expected = model.forward_intermediates(paddle.to_tensor(batch), [1, -1], intermediates_only=True)
        outputs = exported.run(batch)
        assert [out.shape for out in outputs] == [(len(batch), 96, 8, 8)] * 2
        for ours, theirs in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=TOLERANCE)
    with pytest.raises(WeightsError, match=r'returns block features \[\[1, 96, 8, 8\], \[1, 96, 8, 8\]\]'):
        exported(images[:1])


def test_blocks_the_model_lacks_exit_2_before_reading_weights(tmp_path, capsys):
    prefix = str(tmp_path / 'out' / 'm')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', TINY_CONFIG, '-pretrained', str(tmp_path / 'none.pdparams'), '-output', prefix,
              '-block_features', '1', '4'])
    assert exit_info.value.code == 2
    assert '-block_features: block index 4 is out of range for 4 blocks' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_missing_weights_exit_2_and_write_nothing(tmp_path, capsys):
    code = main(['-cfg', TINY_CONFIG, '-pretrained', str(tmp_path / 'none.pdparams'), '-output', str(tmp_path / 'm')])
    assert code == 2 and '-pretrained: file not found' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_weights_of_another_architecture_exit_2_and_write_nothing(tmp_path, capsys):
    deeper = save_weights(tmp_path / 'deeper.pdparams', trained_like_state(tiny_config('MODEL.DEPTH', 6)))
    code = main(['-cfg', TINY_CONFIG, '-pretrained', deeper, '-output', str(tmp_path / 'out' / 'm')])
    err = capsys.readouterr().err
    assert code == 2 and f'-pretrained {deeper}: ' in err and 'blocks.4' in err
    assert not (tmp_path / 'out').exists()


def test_bad_config_exit_2(tmp_path, capsys):
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    code = main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', str(tmp_path / 'm'),
                 '-opts', 'MODEL.DEPHT', '2'])
    assert code == 2 and 'unknown config key MODEL.DEPHT' in capsys.readouterr().err


def test_output_and_weights_are_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', TINY_CONFIG, '-pretrained', 'weights.pdparams'])
    assert exit_info.value.code == 2 and '-output PREFIX are required' in capsys.readouterr().err


def test_bf16_on_a_cpu_without_support_is_refused_clearly(tmp_path, monkeypatch):
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    prefix = export(tmp_path, weights)
    monkeypatch.setattr(inference, 'bf16_supported', lambda: False)
    with pytest.raises(WeightsError, match='bf16 inference needs a CPU with bfloat16 support'):
        ExportedPredictor(prefix, 'bf16')


def program_ops(prefix: str) -> list:
    """The op names of an exported PIR program, in order (parameters aside)."""
    program = json.loads(Path(prefix + '.json').read_text())['program']
    ops = program['regions'][0]['blocks'][0]['ops']
    return [op['#'] for op in ops if op['#'] != 'p']


def test_the_export_traces_the_same_program_on_any_device(tmp_path, monkeypatch):
    """A model exported on a GPU machine must carry the pattern Paddle Inference's oneDNN passes fuse, not sdpa."""
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    on_cpu = export(tmp_path / 'cpu', weights, '-opts', 'MODEL.FUSED_ATTN', 'True')
    monkeypatch.setattr(beit, 'on_accelerator', lambda x: True)
    on_gpu = export(tmp_path / 'gpu', weights, '-opts', 'MODEL.FUSED_ATTN', 'True')
    assert {'1.matmul', '1.softmax'} <= set(program_ops(on_cpu))
    assert program_ops(on_gpu) == program_ops(on_cpu)


def program_places(prefix: str) -> set:
    """The places recorded in an exported program's ops (PIR attribute a_place: [allocation type, id, name];
    0 undefined, 1 CPU, 2 GPU)."""
    ops = json.loads(Path(prefix + '.json').read_text())['program']['regions'][0]['blocks'][0]['ops']
    return {tuple(attr['AT']['D']) for op in ops for attr in op.get('A', [])
            if isinstance(attr, dict) and attr.get('N') == 'place'}


def test_the_export_builds_and_traces_on_the_cpu_of_a_gpu_machine(tmp_path, monkeypatch):
    """PIR full ops record the place they were traced on: on a machine whose Paddle runs on 'gpu:0' the model is
    built and traced with the device set to the CPU (a stand-in device setting records it), then set back."""
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    on_cpu = export(tmp_path / 'cpu', weights)
    device = {'now': 'gpu:0'}
    seen = []
    monkeypatch.setattr(paddle, 'get_device', lambda: device['now'])
    monkeypatch.setattr(paddle, 'set_device', lambda name: device.update(now=name))

    def recorded(step):
        real = getattr(export_model, step)
        return lambda *args, **kwargs: seen.append((step, device['now'])) or real(*args, **kwargs)

    for step in ('load_model', 'export'):
        monkeypatch.setattr(export_model, step, recorded(step))
    on_gpu = export(tmp_path / 'gpu', weights)
    assert seen == [('load_model', 'cpu'), ('export', 'cpu')] and device['now'] == 'gpu:0'
    assert program_ops(on_gpu) == program_ops(on_cpu)
    assert program_places(on_gpu) == program_places(on_cpu) <= {(0, 0, ''), (1, 0, '')}


# ---- segmentation: the crop model ----------------------------------------------------------------------------------


def seg_config():
    return get_config(SEG_CONFIG)


def export_segmentor(tmp_path, weights: str, *extra) -> str:
    prefix = str(tmp_path / 'exported' / 'segmentor')
    assert main(['-segmentation', '-cfg', SEG_CONFIG, '-pretrained', weights, '-output', prefix, *extra]) == 0
    return prefix


def test_segmentation_export_is_the_dygraph_crop_model_for_any_batch_size(tmp_path, photo_paths):
    """-segmentation: the eval BeitUperNet's main logits of DATA.IMAGE_SIZE crops, unresized (what seg_inference
    takes from a model call), equal to dygraph's; the config recorded next to it."""
    config = seg_config()
    state = trained_like_seg_state(config)
    prefix = export_segmentor(tmp_path, save_weights(tmp_path / 'segmentor.pdparams', state))
    model = build_beit_upernet(config)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
    model.eval()
    exported = ExportedPredictor(prefix, onednn_placement=False)
    assert exported.input_name == 'crops'
    crops = photo_batch(photo_paths, config)
    for batch in (crops[:1], crops[:3], crops):
        with paddle.no_grad():
            expected = model(paddle.to_tensor(batch)).numpy()
        [logits] = exported.run(batch)
        assert logits.shape == expected.shape == (len(batch), 4, 32, 32)  # level 0: 4x the 8x8 patch grid
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE)
    assert np.abs(expected).max() > 1  # logits that tell classes apart, not a near-zero head
    written = get_config(prefix + '.yaml')
    assert written.SEG.NUM_CLASSES == 4 and written.SEG.IMG_SCALE == [64, 40] and written.DATA.IMAGE_SIZE == 32


def test_segmentation_weights_without_segmentation_exit_2_naming_the_file(tmp_path, capsys):
    weights = save_weights(tmp_path / 'segmentor.pdparams', trained_like_seg_state(seg_config()))
    code = main(['-cfg', SEG_CONFIG, '-pretrained', weights, '-output', str(tmp_path / 'out' / 'm')])
    err = capsys.readouterr().err
    assert code == 2 and f"-pretrained {weights}: a segmentation model's weights" in err and '-segmentation' in err
    assert not (tmp_path / 'out').exists()


def test_classification_weights_with_segmentation_exit_2_naming_the_file(tmp_path, capsys):
    weights = save_weights(tmp_path / 'classifier.pdparams', trained_like_state(tiny_config()))
    code = main(['-segmentation', '-cfg', SEG_CONFIG, '-pretrained', weights, '-output', str(tmp_path / 'out' / 'm')])
    err = capsys.readouterr().err
    assert code == 2 and f'-pretrained {weights}: the file holds no segmentation weights' in err
    assert not (tmp_path / 'out').exists()


def test_segmentation_export_refuses_settings_the_predictor_cannot_use(tmp_path, capsys):
    weights = save_weights(tmp_path / 'segmentor.pdparams', trained_like_seg_state(seg_config()))
    code = main(['-segmentation', '-cfg', SEG_CONFIG, '-pretrained', weights, '-output', str(tmp_path / 'out' / 'm'),
                 '-opts', 'SEG.SLIDE_STRIDE', '40'])
    assert code == 2 and 'SEG.SLIDE_STRIDE and DATA.IMAGE_SIZE' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_segmentation_and_block_features_are_refused_together(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-segmentation', '-cfg', SEG_CONFIG, '-pretrained', 'w.pdparams', '-output', str(tmp_path / 'm'),
              '-block_features', '1'])
    assert exit_info.value.code == 2 and '-block_features exports a classifier' in capsys.readouterr().err

