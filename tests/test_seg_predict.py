"""seg_predict.py: the palette, the map and overlay images, the class shares, where maps go and what they may not
replace, whole-image mode's sizes, the exported crop model's guard, and the Paddle bug its predictor works around."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import inference as paddle_infer
from paddle.static import InputSpec
from PIL import Image

import export_model
import seg_predict
from config import ConfigError
from helpers import TINY_CONFIG, tiny_config
from inference import ONEDNN_PLACEMENT_PASS, ExportedPredictor, WeightsError
from seg_inference import InferenceSettings
from seg_predict import (
    ExportedCropModel,
    OutputError,
    Outputs,
    check_whole_mode,
    class_shares,
    map_image,
    overlay,
    plan_outputs,
)
from tiny_weights import save_weights, trained_like_state

# PASCAL VOC's colour map (its devkit's labelcolormap), first ten entries and its 255 ("void")
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
               6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 255: (224, 224, 192)}


def test_the_palette_is_vocs_with_256_distinct_colours():
    palette = seg_predict.PALETTE
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    for index, colour in VOC_COLOURS.items():
        assert tuple(palette[index]) == colour, index
    assert len({tuple(colour) for colour in palette}) == 256


def test_a_map_image_holds_the_classes_as_palette_indices(tmp_path):
    classes = np.array([[0, 1, 2], [3, 149, 0]], np.uint8)
    map_image(classes).save(tmp_path / 'map.png')
    with Image.open(tmp_path / 'map.png') as image:
        assert image.mode == 'P' and image.size == (3, 2)
        np.testing.assert_array_equal(np.asarray(image), classes)
        assert image.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
        np.testing.assert_array_equal(np.asarray(image.convert('RGB')), seg_predict.PALETTE[classes])


def test_the_overlay_blends_image_and_colours_by_alpha():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    classes = rng.integers(0, 11, (5, 7)).astype(np.uint8)
    colours = seg_predict.PALETTE[classes].astype(np.float64)
    np.testing.assert_array_equal(overlay(image, classes, 0.0), image)
    np.testing.assert_array_equal(overlay(image, classes, 1.0), seg_predict.PALETTE[classes])
    expected = np.floor(0.7 * image + 0.3 * colours + 0.5)
    assert np.abs(overlay(image, classes, 0.3).astype(np.float64) - expected).max() <= 1  # float32 rounding
    assert overlay(image, classes, 0.3).dtype == np.uint8


def test_class_shares_list_the_present_classes_largest_first():
    classes = np.array([[2, 2, 0, 1], [2, 0, 0, 1]], np.uint8)
    shares = class_shares(classes, ['sky', 'tree', 'road', 'car'])
    assert shares == [{'index': 0, 'name': 'sky', 'share': 0.375}, {'index': 2, 'name': 'road', 'share': 0.375},
                      {'index': 1, 'name': 'tree', 'share': 0.25}]


def test_maps_go_to_the_folder_by_stem(tmp_path):
    images = [str(tmp_path / 'in' / 'a.jpg'), str(tmp_path / 'b.png')]
    planned = plan_outputs(images, str(tmp_path / 'out'), inputs=images, with_overlay=True, overwrite=False)
    assert planned == [Outputs(images[0], str(tmp_path / 'out' / 'a.png'), str(tmp_path / 'out' / 'a_overlay.png')),
                       Outputs(images[1], str(tmp_path / 'out' / 'b.png'), str(tmp_path / 'out' / 'b_overlay.png'))]
    [alone] = plan_outputs(images[:1], str(tmp_path), inputs=images, with_overlay=False, overwrite=False)
    assert alone.overlay is None


def test_an_input_image_is_never_replaced_even_with_overwrite(tmp_path):
    png = tmp_path / 'photo.png'
    png.write_bytes(b'the user\'s image')
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f'{png} would replace the input image {png}'):
            plan_outputs([str(png)], str(tmp_path), inputs=[str(png)], with_overlay=False, overwrite=overwrite)
    overlay_input = tmp_path / 'photo_overlay.png'  # named as photo.png's overlay would be
    overlay_input.write_bytes(b'another image')
    other = tmp_path / 'other'
    other.mkdir()
    jpg = other / 'photo.jpg'
    with pytest.raises(OutputError, match='would replace the input image'):
        plan_outputs([str(jpg)], str(tmp_path), inputs=[str(jpg), str(overlay_input)], with_overlay=True,
                     overwrite=True)
    assert png.read_bytes() == b'the user\'s image'


def test_two_images_of_one_stem_are_refused(tmp_path):
    images = [str(tmp_path / 'a' / 'x.jpg'), str(tmp_path / 'b' / 'x.jpg')]
    with pytest.raises(OutputError, match=f'{images[0]} and {images[1]} would both write {tmp_path / "out" / "x.png"}'):
        plan_outputs(images, str(tmp_path / 'out'), inputs=images, with_overlay=False, overwrite=False)


def test_existing_files_need_overwrite_and_folders_are_refused(tmp_path):
    (tmp_path / 'x.png').write_bytes(b'an earlier map')
    image = str(tmp_path / 'in' / 'x.jpg')
    with pytest.raises(OutputError, match=f'{tmp_path / "x.png"} exists: .* -overwrite'):
        plan_outputs([image], str(tmp_path), inputs=[image], with_overlay=False, overwrite=False)
    assert plan_outputs([image], str(tmp_path), inputs=[image], with_overlay=False, overwrite=True)
    (tmp_path / 'x_overlay.png').mkdir()
    with pytest.raises(OutputError, match='x_overlay.png is a folder'):
        plan_outputs([image], str(tmp_path), inputs=[image], with_overlay=True, overwrite=True)
    with pytest.raises(OutputError, match='is a file, not a folder'):
        plan_outputs([image], str(tmp_path / 'x.png'), inputs=[image], with_overlay=False, overwrite=True)


def test_whole_mode_takes_only_images_whose_scales_are_the_crop():
    whole = InferenceSettings(crop_size=(56, 56), stride=(28, 28), img_scale=(56, 56), mode='whole')
    check_whole_mode({'square.jpg': (96, 96)}, whole)  # 96x96 -> 56x56
    with pytest.raises(ConfigError, match=r'SEG.TEST_MODE whole: wide.jpg \(96x128\) is resized to 42x56, and the '
                                          r'model takes 56x56 \(DATA.IMAGE_SIZE\) only: use SEG.TEST_MODE slide'):
        check_whole_mode({'square.jpg': (96, 96), 'wide.jpg': (96, 128)}, whole)
    check_whole_mode({'wide.jpg': (96, 128)}, InferenceSettings(crop_size=(56, 56), stride=(28, 28),
                                                                 img_scale=(56, 56)))


def test_a_classifiers_export_is_refused_as_a_crop_model(tmp_path):
    prefix = str(tmp_path / 'classifier')
    weights = save_weights(tmp_path / 'weights.pdparams', trained_like_state(tiny_config()))
    assert export_model.main(['-cfg', TINY_CONFIG, '-pretrained', weights, '-output', prefix]) == 0
    with pytest.raises(WeightsError, match=f"{prefix} is not a segmentor's crop model \\(its input is 'image', "
                                           "not 'crops'\\)"):
        ExportedCropModel(prefix)


def test_bf16_is_not_offered_without_the_onednn_placement(tmp_path):
    with pytest.raises(ValueError, match='bf16 is offered with the oneDNN placement only'):
        ExportedPredictor(str(tmp_path / 'any'), 'bf16', onednn_placement=False)


class Upsample(paddle.nn.Layer):
    def forward(self, x):
        return F.interpolate(x, size=[16, 16], mode='bilinear', align_corners=False)


def test_paddle_still_cannot_run_bilinear_interp_on_onednn_placement(tmp_path):
    """Why ExportedCropModel runs without ONEDNN_PLACEMENT_PASS (PaddlePaddle/Paddle#79749): when this test fails,
    Paddle runs it, and the seg export can use the full oneDNN placement (and bf16) like the classifier."""
    prefix = str(tmp_path / 'upsample')
    paddle.jit.save(paddle.jit.to_static(Upsample(), input_spec=[InputSpec([None, 2, 8, 8], 'float32', 'x')],
                                         full_graph=True), prefix)
    images = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)

    def run(placement: bool) -> np.ndarray:
        config = paddle_infer.Config(prefix + '.json', prefix + '.pdiparams')
        config.disable_gpu()
        config.disable_glog_info()
        config.enable_onednn()
        if not placement:
            config.delete_pass(ONEDNN_PLACEMENT_PASS)
        predictor = paddle_infer.create_predictor(config)
        handle = predictor.get_input_handle('x')
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(images)
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()

    with pytest.raises(NotImplementedError, match='ArrayAttribute<pir::DoubleAttribute>'):
        run(placement=True)
    expected = F.interpolate(paddle.to_tensor(images), size=[16, 16], mode='bilinear', align_corners=False).numpy()
    np.testing.assert_allclose(run(placement=False), expected, rtol=0, atol=1e-6)
