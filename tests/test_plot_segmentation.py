"""plot_segmentation.py on the demo's canvases with a random segmentor: predictions.png holds the first validation
images, their annotations and seg_inference.segment's argmax in the palette's colours, pixel for pixel; bad
weights, configs and outputs exit 2 with nothing written."""
import os
import stat

import numpy as np
import paddle
import pytest
from PIL import Image

import plot_segmentation
from beit_seg import build_beit_upernet
from config import get_config, validate_config
from helpers import ROOT, TINY_CONFIG, tiny_config
from seg_figure import CAPTION_BAND, GAP, LEGEND_WIDTH, MARGIN, SCALE, TITLE_BAND, Layout
from seg_inference import segment, settings_from_config
from seg_predict import PALETTE
from seg_transforms import normalise, resize_bilinear
from tiny_weights import save_weights, trained_like_seg_state, trained_like_state

FASHION_CONFIG = str(ROOT / 'configs' / 'beit_tiny_seg_fashion.yaml')
FASHION = ROOT / 'data' / 'fashion_seg'
SHOWN = 3


@pytest.fixture(scope='module')
def config():
    config = get_config(FASHION_CONFIG)
    validate_config(config)
    return config


@pytest.fixture(scope='module')
def state(config):
    return trained_like_seg_state(config)


@pytest.fixture(scope='module')
def weights(tmp_path_factory, state):
    return save_weights(tmp_path_factory.mktemp('weights') / 'segmentor.pdparams', state)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = plot_segmentation.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_rows(state: dict, config) -> list:
    """(image, annotation, argmax) of the first validation canvases, decoded with PIL here and segmented by
    seg_inference.segment on views made here, with a model given the weights directly."""
    model = build_beit_upernet(config)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
    model.eval()
    rows = []
    for path in sorted((FASHION / 'images' / 'validation').glob('*.jpg'))[:SHOWN]:
        image = np.asarray(Image.open(path).convert('RGB'))
        labels = np.asarray(Image.open(FASHION / 'annotations' / 'validation' / f'{path.stem}.png'))

        def view(shape, image=image):
            return normalise(resize_bilinear(image, shape[1], shape[0]), config.DATA.IMAGENET_MEAN,
                             config.DATA.IMAGENET_STD)[None]

        rows.append((image, labels, segment(model, view, image.shape[:2], settings_from_config(config)).numpy()[0]))
    return rows


def enlarged(panel: np.ndarray) -> np.ndarray:
    return np.kron(panel, np.ones((SCALE, SCALE, 1), panel.dtype))


def test_the_picture_shows_images_annotations_and_the_evaluation_argmax(capsys, tmp_path, config, state, weights):
    output = tmp_path / 'run'
    code, out, err = run(capsys, '-cfg', FASHION_CONFIG, '-pretrained', weights, '-output', output,
                         '-num_images', SHOWN)
    assert code == 0, err
    assert out == f'wrote {output / "predictions.png"} ({SHOWN} validation images)\n'
    assert sorted(p.name for p in output.iterdir()) == ['predictions.png']
    with Image.open(output / 'predictions.png') as image:
        picture = np.asarray(image.convert('RGB'))
    rows = expected_rows(state, config)
    cell = SCALE * max(image.shape[0] for image, _, _ in rows), SCALE * max(image.shape[1] for image, _, _ in rows)
    assert cell == (256, 256)  # the canvases are 128x96 and 96x128
    assert picture.shape[:2] == (TITLE_BAND + SHOWN * (CAPTION_BAND + cell[0]) + MARGIN,
                                 MARGIN + 3 * (cell[1] + GAP) + MARGIN + LEGEND_WIDTH)
    layout = Layout(SHOWN, cell, 0)
    predicted = set()
    for number, (image, labels, argmax) in enumerate(rows):
        for column, panel in enumerate((image, PALETTE[labels], PALETTE[argmax])):
            np.testing.assert_array_equal(picture[layout.box(number, column, enlarged(panel).shape)], enlarged(panel))
        predicted |= set(np.unique(argmax).tolist())
    assert len(predicted) >= 3  # maps of several classes, not one constant answer


def test_an_earlier_picture_is_replaced(capsys, tmp_path, weights):
    (tmp_path / 'predictions.png').write_bytes(b'an earlier run')
    code, _, err = run(capsys, '-cfg', FASHION_CONFIG, '-pretrained', weights, '-output', tmp_path, '-num_images', 1)
    assert code == 0, err
    with Image.open(tmp_path / 'predictions.png') as image:
        assert image.size[1] == TITLE_BAND + CAPTION_BAND + 2 * 96 + MARGIN  # one 128x96 canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ['predictions.png']  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / 'predictions.png').stat().st_mode) == 0o666 & ~umask  # readable as any output


@pytest.fixture(scope='module')
def classifier_weights(tmp_path_factory):
    return save_weights(tmp_path_factory.mktemp('classifier') / 'classifier.pdparams',
                        trained_like_state(tiny_config()))


def test_bad_weights_config_or_output_exit_2_with_nothing_written(capsys, tmp_path, weights, classifier_weights):
    output = tmp_path / 'run'
    missing_config = tmp_path / 'missing.yaml'
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    cases = [
        ((FASHION_CONFIG, tmp_path / 'none.pdparams', output), f'-pretrained: file not found: {tmp_path}'),
        ((FASHION_CONFIG, classifier_weights, output),
         f'-pretrained {classifier_weights}: the file holds no segmentation weights'),
        ((missing_config, weights, output), f'config file not found: {missing_config}'),
        ((TINY_CONFIG, weights, output), 'SEG.OUT_INDICES must be 4 increasing block indices'),  # no segmentor's
        ((FASHION_CONFIG, weights, output, '-data_path', tmp_path / 'nodata'), str(tmp_path / 'nodata')),
        ((FASHION_CONFIG, weights, a_file), f'-output {a_file} is a file, not a folder'),
    ]
    for (config_path, weights_path, folder, *more), message in cases:
        code, out, err = run(capsys, '-cfg', config_path, '-pretrained', weights_path, '-output', folder, *more)
        assert code == 2 and out == '' and message in err, err
        assert not output.exists() and a_file.read_text() == 'not a folder'


def test_an_earlier_picture_stays_when_the_weights_are_bad(capsys, tmp_path, classifier_weights):
    (tmp_path / 'predictions.png').write_bytes(b'an earlier run')
    code, _, err = run(capsys, '-cfg', FASHION_CONFIG, '-pretrained', classifier_weights, '-output', tmp_path)
    assert code == 2 and str(classifier_weights) in err
    assert (tmp_path / 'predictions.png').read_bytes() == b'an earlier run'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['predictions.png']


@pytest.mark.parametrize('argv, message', [
    (['-cfg', FASHION_CONFIG, '-output', 'out'], '-pretrained WEIGHTS is required'),
    (['-cfg', FASHION_CONFIG, '-pretrained', 'w.pdparams'], '-output FOLDER is required'),
    (['-cfg', FASHION_CONFIG, '-pretrained', 'w.pdparams', '-output', 'out', '-num_images', '0'],
     '-num_images must be at least 1'),
])
def test_missing_or_bad_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        plot_segmentation.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_ema_draws_a_checkpoints_ema_weights(capsys, tmp_path, config):
    model_state, ema_state = trained_like_seg_state(config, seed=1), trained_like_seg_state(config, seed=2)
    checkpoint = save_weights(tmp_path / 'checkpoint.pdparams', model_state, ema_state)
    bare_ema = save_weights(tmp_path / 'ema.pdparams', ema_state)

    def picture(name: str, weights_path, *flags) -> bytes:
        argv = ('-cfg', FASHION_CONFIG, '-pretrained', weights_path, '-output', tmp_path / name, '-num_images', 1)
        assert run(capsys, *argv, *flags)[0] == 0
        return (tmp_path / name / 'predictions.png').read_bytes()

    ema = picture('ema', checkpoint, '-ema')
    assert ema == picture('bare_ema', bare_ema) and ema != picture('model', checkpoint)
