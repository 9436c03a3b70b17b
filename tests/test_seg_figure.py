"""seg_figure's pieces on small hand-made maps: the colours (ignored pixels apart from every class), the pixel
accuracy evaluation counts, the legend of the classes shown, and a layout whose PNG holds every panel exactly."""
import numpy as np
from PIL import Image

from seg_figure import (
    CAPTION_BAND,
    GAP,
    LEGEND_WIDTH,
    MARGIN,
    SCALE,
    TITLE_BAND,
    Layout,
    Row,
    caption,
    coloured,
    draw,
    legend_entries,
    panels,
    pixel_accuracy,
)
from seg_predict import PALETTE

IGNORE = 255
NAMES = ('background', 'cat', 'dog')
IGNORED_COLOUR = (224, 224, 192)  # PASCAL VOC's colour of 255


def row(name: str, labels, prediction) -> Row:
    labels, prediction = np.array(labels, np.uint8), np.array(prediction, np.uint8)
    image = np.random.default_rng(len(name)).integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    return Row(name, image, labels, prediction)


def test_classes_take_the_palette_and_ignored_pixels_a_colour_no_class_has():
    labels = np.array([[0, 1, 2], [IGNORE, 10, 1]], np.uint8)
    colours = coloured(labels, IGNORE)
    assert colours[0, 0].tolist() == [0, 0, 0] and colours[0, 1].tolist() == [128, 0, 0]
    np.testing.assert_array_equal(colours[1, 1], PALETTE[10])
    assert colours[1, 0].tolist() == list(IGNORED_COLOUR)
    assert not (PALETTE[:IGNORE] == IGNORED_COLOUR).all(axis=1).any()
    assert coloured(np.array([[200]], np.uint8), 200)[0, 0].tolist() == list(IGNORED_COLOUR)  # any ignore index


def test_pixel_accuracy_counts_the_labelled_pixels_only():
    labels = np.array([[0, 1], [2, IGNORE]], np.uint8)
    assert pixel_accuracy(labels, np.array([[0, 1], [1, 1]], np.uint8), IGNORE) == 2 / 3
    assert pixel_accuracy(np.full((2, 2), IGNORE, np.uint8), np.zeros((2, 2), np.uint8), IGNORE) is None
    assert caption(row('a.jpg', [[0, 1], [2, IGNORE]], [[0, 1], [1, 1]]), IGNORE) == 'a.jpg: pixel accuracy 66.7%'
    assert caption(row('b.jpg', [[IGNORE]], [[1]]), IGNORE) == 'b.jpg: no labelled pixels'


def test_the_legend_names_the_classes_of_truths_and_predictions_then_the_ignored():
    rows = [row('a', [[0, 0]], [[0, 2]]), row('b', [[0, IGNORE]], [[0, 0]])]
    assert legend_entries(rows, NAMES, IGNORE) == [(0, '0 background'), (2, '2 dog'), (IGNORE, 'ignored (255)')]
    assert legend_entries(rows[:1], NAMES, IGNORE) == [(0, '0 background'), (2, '2 dog')]


def test_panels_are_the_maps_enlarged_by_repeating_pixels():
    shown = row('a', [[0, 1], [2, IGNORE]], [[1, 1], [0, 2]])
    image, truth, prediction = panels(shown, IGNORE)
    assert image.shape == (2 * SCALE, 2 * SCALE, 3)
    np.testing.assert_array_equal(image[::SCALE, ::SCALE], shown.image)
    np.testing.assert_array_equal(image[SCALE - 1::SCALE, SCALE - 1::SCALE], shown.image)
    np.testing.assert_array_equal(truth[::SCALE, ::SCALE], coloured(shown.labels, IGNORE))
    np.testing.assert_array_equal(prediction[::SCALE, ::SCALE], PALETTE[shown.prediction])


def test_the_png_holds_every_panel_unresampled_in_a_cell_of_the_largest_image(tmp_path):
    rng = np.random.default_rng(0)
    rows = [row(name, rng.integers(0, 3, shape), rng.integers(0, 3, shape))
            for name, shape in (('wide', (6, 9)), ('tall', (11, 5)), ('small', (3, 3)))]
    path = tmp_path / 'predictions.png'
    layout = draw(rows, NAMES, IGNORE, str(path))
    assert layout.cell == (11 * SCALE, 9 * SCALE)
    with Image.open(path) as image:
        assert image.mode in ('RGB', 'RGBA')
        picture = np.asarray(image.convert('RGB'))
    assert picture.shape[:2] == (TITLE_BAND + 3 * (CAPTION_BAND + 11 * SCALE) + MARGIN,
                                 MARGIN + 3 * (9 * SCALE + GAP) + MARGIN + LEGEND_WIDTH)
    assert picture.shape[:2] == layout.size
    for number, shown in enumerate(rows):
        for column, panel in enumerate(panels(shown, IGNORE)):
            np.testing.assert_array_equal(picture[layout.box(number, column, panel.shape)], panel)


def test_a_tall_legend_makes_the_picture_taller():
    few, many = Layout(1, (10, 10), 2), Layout(1, (10, 10), 40)
    assert many.size[0] > few.size[0] and many.size[1] == few.size[1]
