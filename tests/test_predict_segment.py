"""predict_segment.py on the demo's canvases: the dygraph segmentor and its export write the same palette maps, equal
to seg_inference.segment's argmax on the evaluation views (the reference path) for every test mode; overlays,
summaries, EMA weights; bad weights, exports, configs, images and outputs refused with names, nothing written."""
import json
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import export_model
import predict_segment
from beit_seg import build_beit_upernet
from config import get_config, merge_opts, validate_config
from helpers import ROOT, TINY_CONFIG, tiny_config
from seg_inference import segment, settings_from_config
from seg_transforms import normalise, resize_bilinear
from tiny_weights import save_weights, trained_like_seg_state, trained_like_state

FASHION_CONFIG = str(ROOT / 'configs' / 'beit_tiny_seg_fashion.yaml')
FASHION = ROOT / 'data' / 'fashion_seg'
CLASS_NAMES = (FASHION / 'classes.txt').read_text(encoding='utf-8').splitlines()


def fashion_config(*opts):
    config = get_config(FASHION_CONFIG)
    merge_opts(config, list(opts))
    validate_config(config)
    return config


def canvases() -> list:
    """The first validation canvas of each of the demo's three sizes (96x96, 128x96, 96x128)."""
    by_size = {}
    for path in sorted((FASHION / 'images' / 'validation').glob('*.jpg')):
        with Image.open(path) as image:
            by_size.setdefault(image.size, path)
    assert len(by_size) == 3
    return list(by_size.values())


CANVASES = canvases()


@pytest.fixture(scope='module')
def state():
    return trained_like_seg_state(fashion_config())


@pytest.fixture(scope='module')
def weights(tmp_path_factory, state):
    return save_weights(tmp_path_factory.mktemp('weights') / 'segmentor.pdparams', state)


@pytest.fixture(scope='module')
def exported(tmp_path_factory, weights):
    prefix = str(tmp_path_factory.mktemp('exported') / 'segmentor')
    assert export_model.main(['-segmentation', '-cfg', FASHION_CONFIG, '-pretrained', weights, '-output', prefix]) == 0
    return prefix


def run(capsys, *argv) -> tuple[int, str, str]:
    code = predict_segment.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def dygraph(weights, output, *images, opts=()):
    """predict_segment's arguments for the dygraph segmentor (-opts last: it takes every word after it)."""
    return ('-cfg', FASHION_CONFIG, '-data_path', FASHION, '-pretrained', weights, '-output', output, *images,
            *(('-opts', *opts) if opts else ()))


def read_map(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == 'P'
        return np.asarray(image)


def reference_map(state: dict, config, path) -> np.ndarray:
    """seg_inference.segment on the image's evaluation views (the data pipeline's resize of the original to each
    scale, then normalised) with a model given the weights directly: the map a PNG must hold."""
    model = build_beit_upernet(config)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
    model.eval()
    image = np.asarray(Image.open(path).convert('RGB'))

    def view(shape):
        resized = resize_bilinear(image, shape[1], shape[0])
        return normalise(resized, config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)[None]

    return segment(model, view, image.shape[:2], settings_from_config(config)).numpy()[0]


def test_dygraph_and_export_write_the_reference_maps(capsys, tmp_path, state, weights, exported):
    code, _, err = run(capsys, *dygraph(weights, tmp_path / 'dygraph', *CANVASES))
    assert code == 0, err
    code, _, err = run(capsys, '-inference_model', exported, '-output', tmp_path / 'exported', *CANVASES)
    assert code == 0, err
    present = set()
    for path in CANVASES:
        ours = read_map(tmp_path / 'dygraph' / f'{path.stem}.png')
        with Image.open(path) as image:
            assert ours.shape == (image.height, image.width)
        np.testing.assert_array_equal(read_map(tmp_path / 'exported' / f'{path.stem}.png'), ours)
        np.testing.assert_array_equal(ours, reference_map(state, fashion_config(), path))
        present |= set(np.unique(ours).tolist())
    assert len(present) >= 3  # maps of several classes, not one constant answer
    assert sorted(p.name for p in (tmp_path / 'exported').iterdir()) == sorted(f'{p.stem}.png' for p in CANVASES)


def test_multi_scale_and_flip_follow_the_config(capsys, tmp_path, state, weights):
    opts = ('SEG.MS_RATIOS', '[0.75, 1.5]', 'SEG.FLIP', 'True')
    code, _, err = run(capsys, *dygraph(weights, tmp_path / 'ms', CANVASES[1], opts=opts))
    assert code == 0, err
    ours = read_map(tmp_path / 'ms' / f'{CANVASES[1].stem}.png')
    np.testing.assert_array_equal(ours, reference_map(state, fashion_config(*opts), CANVASES[1]))
    assert (ours != reference_map(state, fashion_config(), CANVASES[1])).any()  # the settings took effect


def test_whole_mode_segments_images_whose_scale_is_the_crop_and_refuses_others(capsys, tmp_path, state, weights):
    opts = ('SEG.TEST_MODE', 'whole', 'SEG.IMG_SCALE', '[56, 56]')
    square = next(path for path in CANVASES if Image.open(path).size == (96, 96))
    code, _, err = run(capsys, *dygraph(weights, tmp_path / 'whole', square, opts=opts))
    assert code == 0, err
    np.testing.assert_array_equal(read_map(tmp_path / 'whole' / f'{square.stem}.png'),
                                  reference_map(state, fashion_config(*opts), square))
    code, out, err = run(capsys, *dygraph(weights, tmp_path / 'refused', *CANVASES, opts=opts))
    assert code == 2 and out == '' and 'SEG.TEST_MODE whole: ' in err and 'use SEG.TEST_MODE slide' in err
    assert not (tmp_path / 'refused').exists()


def test_overlay_and_summary(capsys, tmp_path, weights):
    code, out, err = run(capsys, *dygraph(weights, tmp_path / 'maps', CANVASES[0], '-overlay', '-alpha', '0.3'))
    assert code == 0, err
    map_path = tmp_path / 'maps' / f'{CANVASES[0].stem}.png'
    overlay_path = tmp_path / 'maps' / f'{CANVASES[0].stem}_overlay.png'
    classes = read_map(map_path)
    with Image.open(map_path) as image:
        colours = np.array(image.getpalette(), np.float64).reshape(-1, 3)[classes]
    with Image.open(overlay_path) as image:
        assert image.mode == 'RGB'
        blended = np.asarray(image).astype(np.float64)
    photo = np.asarray(Image.open(CANVASES[0]).convert('RGB')).astype(np.float64)
    assert np.abs(blended - np.floor(0.7 * photo + 0.3 * colours + 0.5)).max() <= 1
    lines = out.splitlines()
    height, width = classes.shape
    assert lines[0] == f'{CANVASES[0]} ({width}x{height}) -> {map_path}, {overlay_path}'
    counts = np.bincount(classes.ravel(), minlength=len(CLASS_NAMES))
    expected = [f'  {counts[k] / classes.size:7.2%}  {CLASS_NAMES[k]} ({k})'
                for k in np.argsort(-counts, kind='stable') if counts[k]]
    assert lines[1:] == expected


def test_json_summary(capsys, tmp_path, weights):
    code, out, _ = run(capsys, *dygraph(weights, tmp_path / 'maps', CANVASES[2], '-json'))
    assert code == 0
    [result] = json.loads(out)['segmented']
    assert result['map'] == str(tmp_path / 'maps' / f'{CANVASES[2].stem}.png') and result['overlay'] is None
    assert sum(entry['share'] for entry in result['classes']) == pytest.approx(1.0)
    assert all(entry['name'] == CLASS_NAMES[entry['index']] for entry in result['classes'])


def test_a_checkpoints_model_or_ema(capsys, tmp_path):
    config = fashion_config()
    model_state, ema_state = trained_like_seg_state(config, seed=1), trained_like_seg_state(config, seed=2)
    checkpoint = save_weights(tmp_path / 'checkpoint.pdparams', model_state, ema_state)
    bare_ema = save_weights(tmp_path / 'ema.pdparams', ema_state)

    def segmented(name, *flags):
        assert run(capsys, *dygraph(flags[0], tmp_path / name, CANVASES[0]), *flags[1:])[0] == 0
        return read_map(tmp_path / name / f'{CANVASES[0].stem}.png')

    ema = segmented('ema', checkpoint, '-ema')
    np.testing.assert_array_equal(ema, segmented('bare_ema', bare_ema))
    assert (ema != segmented('model', checkpoint)).any()


def test_a_config_that_disagrees_with_the_export_exit_2(capsys, tmp_path, exported):
    code, _, err = run(capsys, '-inference_model', exported, '-output', tmp_path / 'out', CANVASES[0],
                       '-opts', 'SEG.SLIDE_STRIDE', '14')
    assert code == 2 and f'SEG.SLIDE_STRIDE is 14 but {exported} was exported with 28' in err
    code, _, err = run(capsys, '-inference_model', exported, '-cfg', FASHION_CONFIG, '-output', tmp_path / 'out',
                       CANVASES[0], '-opts', 'SEG.FLIP', 'True')
    assert code == 2 and f'SEG.FLIP is True but {exported} was exported with False' in err
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def classification_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('classifier')
    weights = save_weights(folder / 'classifier.pdparams', trained_like_state(tiny_config()))
    assert export_model.main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', str(folder / 'exported')]) == 0
    return weights, str(folder / 'exported')


def test_weights_and_exports_that_are_no_segmentor_exit_2_with_nothing_written(capsys, tmp_path,
                                                                               classification_files):
    weights, prefix = classification_files
    output = tmp_path / 'out'
    cases = [
        (dygraph(tmp_path / 'none.pdparams', output, CANVASES[0]), f'-pretrained: file not found: {tmp_path}'),
        (dygraph(weights, output, CANVASES[0]), f'-pretrained {weights}: the file holds no segmentation weights'),
        (('-inference_model', prefix, '-output', output, CANVASES[0]),
         f"{prefix} is not a segmentor's crop model (its input is 'image', not 'crops')"),
        (('-inference_model', tmp_path / 'nothing', '-output', output, CANVASES[0]),
         f'no exported model at {tmp_path / "nothing"}'),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == '' and message in err, err
        assert not output.exists()


def test_unreadable_images_are_named_and_the_others_segmented(capsys, tmp_path, weights):
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(CANVASES[0].read_bytes()[:len(CANVASES[0].read_bytes()) // 2])  # its header reads
    notes = tmp_path / 'notes.jpg'
    notes.write_text('not a picture')
    missing = tmp_path / 'missing.png'
    code, out, err = run(capsys, *dygraph(weights, tmp_path / 'maps', CANVASES[0], truncated, CANVASES[1], notes,
                                          missing, '-json'))
    assert code == 0
    report = json.loads(out)
    assert [r['image'] for r in report['segmented']] == [str(CANVASES[0]), str(CANVASES[1])]
    # headers first (notes, missing), then a body that fails to decode when its turn comes (each decoded once)
    assert [e['image'] for e in report['errors']] == [str(notes), str(missing), str(truncated)]
    for bad in (truncated, notes, missing):
        assert f'cannot read {bad}' in err
    assert sorted(p.name for p in (tmp_path / 'maps').iterdir()) == sorted(f'{p.stem}.png' for p in CANVASES[:2])
    code, out, err = run(capsys, *dygraph(weights, tmp_path / 'none', notes))
    assert code == 1 and out == '' and f'cannot read {notes}' in err
    assert not (tmp_path / 'none').exists()


def test_maps_never_replace_inputs_and_replace_earlier_maps_only_with_overwrite(capsys, tmp_path, weights):
    folder = tmp_path / 'photos'
    folder.mkdir()
    png = folder / 'canvas.png'
    Image.open(CANVASES[0]).save(png)
    before = png.read_bytes()
    code, out, err = run(capsys, *dygraph(weights, folder, png, '-overwrite'))
    assert code == 2 and out == '' and f'{png} would replace the input image {png}' in err
    assert png.read_bytes() == before and sorted(folder.iterdir()) == [png]
    assert run(capsys, *dygraph(weights, tmp_path / 'maps', png))[0] == 0
    first = (tmp_path / 'maps' / 'canvas.png').read_bytes()
    code, _, err = run(capsys, *dygraph(weights, tmp_path / 'maps', png))
    assert code == 2 and f'{tmp_path / "maps" / "canvas.png"} exists' in err
    (tmp_path / 'maps' / 'canvas.png').write_bytes(b'stale')
    assert run(capsys, *dygraph(weights, tmp_path / 'maps', png, '-overwrite'))[0] == 0
    assert (tmp_path / 'maps' / 'canvas.png').read_bytes() == first


@pytest.mark.parametrize('argv, message', [
    (['-cfg', FASHION_CONFIG, '-output', 'maps'], 'give -pretrained WEIGHTS'),
    (['-inference_model', 'exported', '-pretrained', 'w.pdparams', '-output', 'maps'], 'drop -pretrained'),
    (['-inference_model', 'exported'], '-output FOLDER is required'),
    (['-inference_model', 'exported', '-output', 'maps', '-alpha', '0.4'], '-alpha weighs the overlay: add -overlay'),
    (['-inference_model', 'exported', '-output', 'maps', '-overlay', '-alpha', '1.5'], '-alpha must lie in [0, 1]'),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        predict_segment.main([*argv, 'room.jpg'])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_the_script_runs_as_a_command(tmp_path, exported):
    command = [sys.executable, str(ROOT / 'predict_segment.py'), '-inference_model', exported, '-output',
               str(tmp_path / 'maps'), '-overlay', str(CANVASES[0])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'{CANVASES[0]} (')
    assert (tmp_path / 'maps' / f'{CANVASES[0].stem}_overlay.png').is_file()
    shutil.rmtree(tmp_path / 'maps')
    done = subprocess.run([*command[:2], '-inference_model', str(tmp_path / 'nothing'), *command[4:]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and 'no exported model at' in done.stderr and not (tmp_path / 'maps').exists()
