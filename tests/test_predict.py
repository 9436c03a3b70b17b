"""predict.py on real photos: dygraph and exported predictors agree, bad input is named, class names are right."""
import json
import shutil

import numpy as np
import pytest

import export_model
import predict
from config import get_config
from helpers import ROOT, TINY_CONFIG, photo_batch, tiny_config
from inference import DygraphPredictor, bf16_supported, load_model
from tiny_weights import save_weights, trained_like_seg_state, trained_like_state

FP32_TOLERANCE = 1e-4  # max abs logit difference, dygraph vs exported fp32
BF16_RELATIVE_TOLERANCE = 0.02  # max abs logit difference / max abs logit, dygraph vs exported bf16
DEMO = ROOT / 'data' / 'fashion_mnist'


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    return save_weights(tmp_path_factory.mktemp('weights') / 'tiny.pdparams', trained_like_state(tiny_config()))


@pytest.fixture(scope='module')
def exported(tmp_path_factory, weights):
    prefix = str(tmp_path_factory.mktemp('exported') / 'tiny')
    assert export_model.main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', prefix]) == 0
    return prefix


def run(capsys, *argv) -> tuple[int, str, str]:
    code = predict.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, '-json')
    assert code == 0, err
    return json.loads(out)


def logits_and_top5(report: dict) -> tuple[np.ndarray, list]:
    tops = [result['top'] for result in report['predictions']]
    return np.array([[entry['logit'] for entry in top] for top in tops]), [[e['index'] for e in top] for top in tops]


def all_logits(report: dict, num_classes: int) -> np.ndarray:
    """[images, classes] logits from a report made with -topk num_classes."""
    rows = [{entry['index']: entry['logit'] for entry in result['top']} for result in report['predictions']]
    return np.array([[row[index] for index in range(num_classes)] for row in rows])


def test_exported_fp32_gives_the_dygraph_top5_and_logits(capsys, photo_paths, weights, exported):
    dygraph = run_json(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, *photo_paths)
    inference = run_json(capsys, '-inference_model', exported, *photo_paths)
    assert [r['image'] for r in dygraph['predictions']] == [str(p) for p in photo_paths]
    dygraph_logits, dygraph_top5 = logits_and_top5(dygraph)
    inference_logits, inference_top5 = logits_and_top5(inference)
    assert inference_top5 == dygraph_top5
    assert len({tuple(top) for top in dygraph_top5}) > 1  # the photos are told apart, not one constant answer
    np.testing.assert_allclose(inference_logits, dygraph_logits, rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.skipif(not bf16_supported(), reason='this CPU has no bfloat16 support (oneDNN: no AVX-512 BF16/AMX)')
def test_exported_bf16_stays_within_the_stated_tolerance(capsys, photo_paths, weights, exported):
    dygraph = run_json(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, '-topk', 10, *photo_paths)
    bf16 = run_json(capsys, '-inference_model', exported, '-precision', 'bf16', '-topk', 10, *photo_paths)
    dygraph_logits, bf16_logits = all_logits(dygraph, 10), all_logits(bf16, 10)
    scale = np.abs(dygraph_logits).max()
    relative = np.abs(bf16_logits - dygraph_logits).max() / scale
    assert 1e-4 < relative <= BF16_RELATIVE_TOLERANCE  # above fp32's 3e-7: bf16 really ran (measured 0.4%)
    runner_up, best = np.sort(dygraph_logits, axis=1)[:, -2:].T
    clear = best - runner_up > 2 * BF16_RELATIVE_TOLERANCE * scale  # bf16 may only swap near-ties
    assert clear.sum() >= 3
    np.testing.assert_array_equal(bf16_logits.argmax(1)[clear], dygraph_logits.argmax(1)[clear])


def test_a_corrupt_image_among_good_ones_is_named_and_the_others_predicted(capsys, tmp_path, photo_paths, weights):
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(photo_paths[0].read_bytes()[:2000])
    not_an_image = tmp_path / 'notes.jpg'
    not_an_image.write_text('not a picture')
    missing = tmp_path / 'missing.png'
    images = [photo_paths[0], truncated, photo_paths[1], not_an_image, missing]
    code, out, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, *images, '-json')
    assert code == 0
    report = json.loads(out)
    assert [r['image'] for r in report['predictions']] == [str(photo_paths[0]), str(photo_paths[1])]
    assert [e['image'] for e in report['errors']] == [str(truncated), str(not_an_image), str(missing)]
    for bad in (truncated, not_an_image, missing):
        assert f'cannot read {bad}' in err


def test_no_readable_image_exits_1(capsys, tmp_path, weights):
    (tmp_path / 'empty.png').write_bytes(b'')
    code, out, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, tmp_path / 'empty.png')
    assert code == 1 and out == '' and 'empty.png' in err


def test_missing_weights_exit_2(capsys, tmp_path, photo_paths):
    code, out, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', tmp_path / 'nothing.pdparams', photo_paths[0])
    assert code == 2 and out == ''
    assert f'-pretrained: file not found: {tmp_path / "nothing.pdparams"}' in err


def test_unreadable_weights_exit_2(capsys, tmp_path, photo_paths):
    (tmp_path / 'broken.pdparams').write_text('not weights')
    code, _, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', tmp_path / 'broken.pdparams', photo_paths[0])
    assert code == 2 and '-pretrained: cannot read' in err


def test_weights_of_another_architecture_exit_2(capsys, tmp_path, photo_paths):
    other = save_weights(tmp_path / 'wide.pdparams', trained_like_state(tiny_config('MODEL.EMBED_DIM', 48)))
    code, out, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', other, photo_paths[0])
    assert code == 2 and out == ''
    assert f'-pretrained {other}: ' in err and 'another architecture' in err


def test_weights_with_another_class_count_exit_2(capsys, tmp_path, photo_paths):
    other = save_weights(tmp_path / 'five.pdparams', trained_like_state(tiny_config('MODEL.NUM_CLASSES', 5)))
    code, _, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', other, photo_paths[0])
    assert code == 2 and 'head.weight [96, 5] holds 5 classes, the model 10 classes (MODEL.NUM_CLASSES)' in err


def test_training_checkpoint_model_or_ema(capsys, tmp_path, photo_paths):
    config = tiny_config()
    model_state, ema_state = trained_like_state(config, seed=1), trained_like_state(config, seed=2)
    checkpoint = save_weights(tmp_path / 'checkpoint.pdparams', model_state, ema_state)
    bare_model = save_weights(tmp_path / 'model.pdparams', model_state)
    bare_ema = save_weights(tmp_path / 'ema.pdparams', ema_state)

    def top(*args):
        return run_json(capsys, '-cfg', TINY_CONFIG, *args, *photo_paths)['predictions']

    assert top('-pretrained', checkpoint) == top('-pretrained', bare_model)
    assert top('-pretrained', checkpoint, '-ema') == top('-pretrained', bare_ema)
    assert top('-pretrained', checkpoint, '-ema') != top('-pretrained', checkpoint)
    code, _, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', bare_model, '-ema', photo_paths[0])
    assert code == 2 and 'holds no EMA weights' in err


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # BEiT v2's normalisation


def test_the_configs_normalisation_prepares_the_input_of_both_predictors(capsys, tmp_path, photo_paths, weights):
    """A config with BEiT v2's ImageNet mean/std (as configs/beitv2_*.yaml) normalises predict.py's input, and its
    export keeps them (PREFIX.yaml): both give the model's logits on the photos normalised that way by hand."""
    cfg_file = tmp_path / 'v2.yaml'
    cfg_file.write_text(f'BASE: {TINY_CONFIG}\nDATA:\n  IMAGENET_MEAN: {IMAGENET_MEAN}\n'
                        f'  IMAGENET_STD: {IMAGENET_STD}\n')
    prefix = str(tmp_path / 'v2')
    assert export_model.main(['-cfg', str(cfg_file), '-pretrained', weights, '-output', prefix]) == 0
    capsys.readouterr()
    num_classes = tiny_config().MODEL.NUM_CLASSES
    dygraph = run_json(capsys, '-cfg', cfg_file, '-pretrained', weights, '-topk', num_classes, *photo_paths)
    exported = run_json(capsys, '-inference_model', prefix, '-topk', num_classes, *photo_paths)
    unnormalised = tiny_config('DATA.IMAGENET_MEAN', '[0.0, 0.0, 0.0]', 'DATA.IMAGENET_STD', '[1.0, 1.0, 1.0]')
    pixels = photo_batch(photo_paths, unnormalised)
    predictor = DygraphPredictor(load_model(tiny_config(), weights)[0])
    expected = predictor(normalised(pixels, IMAGENET_MEAN, IMAGENET_STD))
    np.testing.assert_allclose(all_logits(dygraph, num_classes), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(all_logits(exported, num_classes), expected, rtol=0, atol=FP32_TOLERANCE)
    assert np.abs(predictor(normalised(pixels, [0.5] * 3, [0.5] * 3)) - expected).max() > 0.1  # it shows


def normalised(pixels: np.ndarray, mean: list, std: list) -> np.ndarray:
    """[B, 3, H, W] pixels in [0, 1] normalised per channel, as float32."""
    return ((pixels - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))).astype(np.float32)


def test_exported_model_refuses_a_config_with_other_preprocessing(capsys, photo_paths, exported):
    code, _, err = run(capsys, '-inference_model', exported, '-cfg', TINY_CONFIG, photo_paths[0],
                       '-opts', 'DATA.CROP_PCT', '0.875')  # -opts takes every word after it: last
    assert code == 2 and 'DATA.CROP_PCT is 0.875 but' in err
    code, _, err = run(capsys, '-inference_model', exported, '-image_size', 48, photo_paths[0])
    assert code == 2 and 'DATA.IMAGE_SIZE is 48 but' in err


def test_missing_exported_model_exit_2(capsys, tmp_path, photo_paths, exported):
    code, _, err = run(capsys, '-inference_model', tmp_path / 'nothing', photo_paths[0])
    assert code == 2 and 'no exported model at' in err and 'nothing.json' in err
    partial = tmp_path / 'partial'
    shutil.copy(exported + '.json', str(partial) + '.json')
    code, _, err = run(capsys, '-inference_model', partial, photo_paths[0])
    assert code == 2 and 'partial.pdiparams' in err and 'partial.yaml' in err


def test_an_export_of_block_features_is_refused_as_a_classifier(capsys, tmp_path, photo_paths, weights):
    prefix = str(tmp_path / 'backbone')
    assert export_model.main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', prefix,
                              '-block_features', '2']) == 0
    capsys.readouterr()
    code, out, err = run(capsys, '-inference_model', prefix, photo_paths[0])
    assert code == 2 and out == '' and 'returns block features [[1, 96, 8, 8]], not logits' in err


def test_a_segmentors_weights_and_export_are_refused_as_such(capsys, tmp_path, photo_paths):
    seg_config = str(ROOT / 'configs' / 'beit_tiny_seg.yaml')
    weights = save_weights(tmp_path / 'segmentor.pdparams', trained_like_seg_state(get_config(seg_config)))
    code, out, err = run(capsys, '-cfg', seg_config, '-pretrained', weights, photo_paths[0])
    assert code == 2 and out == ''
    assert f"-pretrained {weights}: a segmentation model's weights" in err and 'predict_segment.py' in err
    prefix = str(tmp_path / 'segmentor')
    assert export_model.main(['-segmentation', '-cfg', seg_config, '-pretrained', weights, '-output', prefix]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, '-inference_model', prefix, photo_paths[0])
    assert code == 2 and out == ''
    assert f"{prefix} is a segmentor's crop model (export_model.py -segmentation), not a classifier" in err


@pytest.mark.parametrize('argv, message', [
    (['-cfg', TINY_CONFIG], 'give -pretrained WEIGHTS'),
    (['-cfg', TINY_CONFIG, '-pretrained', 'w.pdparams', '-precision', 'bf16'],
     '-precision bf16 needs -inference_model'),
    (['-inference_model', 'exported', '-pretrained', 'w.pdparams'], 'drop -pretrained'),
    (['-cfg', TINY_CONFIG, '-pretrained', 'w.pdparams', '-topk', '0'], '-topk must be at least 1'),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*argv, 'dog.jpg'])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_imagenet_names_are_timms_1000_lemmas():
    from timm.data import ImageNetInfo
    lines = (ROOT / 'data' / 'imagenet_classes.txt').read_text(encoding='utf-8').split('\n')
    assert lines[-1] == '' and len(lines[:-1]) == 1000
    assert lines[0] == 'tench, Tinca tinca' and lines[1] == 'goldfish, Carassius auratus'
    info = ImageNetInfo()
    assert lines[:-1] == [info.index_to_description(index) for index in range(1000)]


def test_class_names_follow_the_documented_order(tmp_path):
    imagenet = tiny_config('MODEL.NUM_CLASSES', 1000)
    assert predict.class_names_for(imagenet, None)[:2] == ['tench, Tinca tinca', 'goldfish, Carassius auratus']
    demo = tiny_config('DATA.DATA_PATH', str(DEMO))
    assert predict.class_names_for(demo, None) == (DEMO / 'classes.txt').read_text().splitlines()
    own = tmp_path / 'names.txt'
    own.write_text(''.join(f'class {k}\n' for k in range(10)))
    assert predict.class_names_for(demo, str(own))[9] == 'class 9'
    assert predict.class_names_for(tiny_config(), None) == [str(k) for k in range(10)]


def test_bad_class_names_file_exit_2(capsys, tmp_path, photo_paths, weights):
    names = tmp_path / 'names.txt'
    names.write_text('shirt\ntrouser\n')
    code, _, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, '-class_names', names, photo_paths[0])
    assert code == 2 and f'{names}: 2 lines (0 empty), expected 10' in err
    code, _, err = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, '-class_names', tmp_path / 'no.txt',
                       photo_paths[0])
    assert code == 2 and 'class names file not found' in err


def test_text_output_names_the_classes_of_a_demo_image(capsys, weights):
    image = DEMO / 'val' / '1_trouser' / sorted(p.name for p in (DEMO / 'val' / '1_trouser').iterdir())[0]
    code, out, _ = run(capsys, '-cfg', TINY_CONFIG, '-pretrained', weights, '-data_path', DEMO, '-topk', 3, image)
    lines = out.splitlines()
    assert code == 0 and lines[0] == str(image) and len(lines) == 4
    names = (DEMO / 'classes.txt').read_text().splitlines()
    for rank, line in enumerate(lines[1:], 1):
        assert line.startswith(f'  {rank}. ') and any(line.endswith(f'{name} ({k})') for k, name in enumerate(names))


def test_top_k_orders_by_probability():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [2.0, -1.0, 0.0, 1.0]], np.float32)
    results = predict.top_k(['a', 'b'], logits, list('wxyz'), 3)
    assert [[e['index'] for e in r['top']] for r in results] == [[1, 3, 2], [0, 3, 2]]
    first = results[0]['top'][0]
    assert first['name'] == 'x' and first['logit'] == 3.0
    assert first['probability'] == pytest.approx(np.exp(3) / np.exp(logits[0]).sum())
