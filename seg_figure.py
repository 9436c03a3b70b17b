"""The picture of a segmentor's predictions next to the ground truth, the logic of plot_segmentation.py.

The rows are the first images of the config's validation split as evaluation reads them (task_segment's val set:
the checked pairs, labels after the label rule, SEG.REDUCE_ZERO_LABEL applied), each segmented as evaluation
segments it (seg_predict.segment_image: seg_inference.segment's argmax). Each row shows three panels: the image, the
ground truth and the prediction, both coloured by PASCAL VOC's palette (seg_predict.PALETTE), ignored pixels
(SEG.IGNORE_INDEX) in the palette's colour of 255, (224, 224, 192), which no class of fewer than 255 has. A caption
above each row gives the image's pixel accuracy (correct / labelled pixels, evaluation's aAcc of one image), a
legend on the right names the classes that appear.

The panels are the label maps enlarged SCALE times by repeating pixels, laid out on one canvas that matplotlib
draws unresampled (figimage) at DPI, a power of two, so the saved PNG holds every panel's pixels exactly
(Layout.box says where); the text is drawn in the bands between them.
"""
import os
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np

from seg_datasets import SegmentationDataset
from seg_inference import Model
from seg_predict import PALETTE, segment_image
from task_segment import SegmentationObjective

FILE_NAME = 'predictions.png'
COLUMNS = ('image', 'ground truth', 'prediction')
IGNORED = 255  # the palette index that colours ignored pixels
SCALE = 2  # screen pixels per image pixel
DPI = 128  # a power of two: pixel sizes / DPI * DPI are exact, so the canvas is not resampled
MARGIN, GAP, TITLE_BAND, CAPTION_BAND = 8, 8, 24, 24
LEGEND_WIDTH, LEGEND_LINE, SWATCH = 190, 20, 14
FONT_SIZE = 8
WHITE = 255


@dataclass(frozen=True)
class Row:
    """One validation image, its labels (SEG.IGNORE_INDEX where unlabelled) and the predicted classes."""

    name: str
    image: np.ndarray  # uint8 [H, W, 3]
    labels: np.ndarray  # uint8 [H, W]
    prediction: np.ndarray  # uint8 [H, W]


def predicted_rows(model: Model, objective: SegmentationObjective, dataset: SegmentationDataset,
                   count: int) -> list[Row]:
    """The first ``count`` images of ``dataset`` (task_segment's val set), segmented as evaluation segments them."""
    rows = []
    for index in range(min(count, len(dataset))):
        image, labels = dataset[index]
        rows.append(Row(os.path.basename(dataset.pairs[index].image), image, labels.astype(np.uint8),
                        segment_image(model, objective, image)))
    return rows


def pixel_accuracy(labels: np.ndarray, prediction: np.ndarray, ignore_index: int) -> float | None:
    """Correct / labelled pixels of one image; None when none is labelled."""
    labelled = labels != ignore_index
    return float((prediction[labelled] == labels[labelled]).mean()) if labelled.any() else None


def caption(row: Row, ignore_index: int) -> str:
    accuracy = pixel_accuracy(row.labels, row.prediction, ignore_index)
    return f'{row.name}: ' + ('no labelled pixels' if accuracy is None else f'pixel accuracy {accuracy:.1%}')


def coloured(classes: np.ndarray, ignore_index: int) -> np.ndarray:
    """uint8 RGB [H, W, 3]: each pixel in its class's palette colour, ``ignore_index`` in the colour of IGNORED."""
    return PALETTE[np.where(classes == ignore_index, IGNORED, classes)]


def enlarged(panel: np.ndarray) -> np.ndarray:
    return panel.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def panels(row: Row, ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row's image, ground truth and prediction as uint8 RGB arrays, enlarged SCALE times."""
    return tuple(enlarged(panel) for panel in (row.image, coloured(row.labels, ignore_index),
                                               coloured(row.prediction, ignore_index)))


def legend_entries(rows: Sequence[Row], names: Sequence[str], ignore_index: int) -> list[tuple[int, str]]:
    """(palette index, text) of every class in a ground truth or prediction shown, by index, then the ignored
    pixels' entry if any is shown."""
    present = set()
    for row in rows:
        present.update(np.unique(row.labels).tolist(), np.unique(row.prediction).tolist())
    entries = [(index, f'{index} {names[index]}') for index in sorted(present - {ignore_index})]
    return entries + ([(IGNORED, f'ignored ({ignore_index})')] if ignore_index in present else [])


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in pixels from the top left: a column per panel kind, a row per image (its caption
    above it); every cell fits the largest enlarged image, a panel sits at its cell's top left."""

    rows: int
    cell: tuple[int, int]  # (height, width)
    legend_lines: int

    @classmethod
    def of(cls, rows: Sequence[Row], legend_lines: int) -> 'Layout':
        return cls(len(rows), (SCALE * max(row.image.shape[0] for row in rows),
                               SCALE * max(row.image.shape[1] for row in rows)), legend_lines)

    def top(self, row: int) -> int:
        """The top of the row's panels (its caption is in the band above)."""
        return TITLE_BAND + CAPTION_BAND + row * (self.cell[0] + CAPTION_BAND)

    def left(self, column: int) -> int:
        return MARGIN + column * (self.cell[1] + GAP)

    def box(self, row: int, column: int, shape: Sequence[int]) -> tuple[slice, slice]:
        """The canvas's slices of a panel of ``shape`` in the cell (row, column)."""
        top, left = self.top(row), self.left(column)
        return slice(top, top + shape[0]), slice(left, left + shape[1])

    @property
    def legend_left(self) -> int:
        return self.left(len(COLUMNS)) + MARGIN

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the picture."""
        return (max(self.top(self.rows) - CAPTION_BAND, TITLE_BAND + self.legend_lines * LEGEND_LINE) + MARGIN,
                self.legend_left + LEGEND_WIDTH)


def canvas(rows: Sequence[Row], layout: Layout, legend: Sequence[tuple[int, str]], ignore_index: int) -> np.ndarray:
    """uint8 RGB [height, width, 3]: the panels and the legend's swatches on white (the text comes on top)."""
    picture = np.full((*layout.size, 3), WHITE, np.uint8)
    for number, row in enumerate(rows):
        for column, panel in enumerate(panels(row, ignore_index)):
            picture[layout.box(number, column, panel.shape)] = panel
    for line, (index, _) in enumerate(legend):
        top = TITLE_BAND + line * LEGEND_LINE
        picture[top:top + SWATCH, layout.legend_left:layout.legend_left + SWATCH] = PALETTE[index]
    return picture


def draw(rows: Sequence[Row], names: Sequence[str], ignore_index: int, path: str) -> Layout:
    """Write the picture of ``rows`` to ``path`` (through a temporary file: a failure leaves no partial PNG) and
    return its layout."""
    legend = legend_entries(rows, names, ignore_index)
    layout = Layout.of(rows, len(legend))
    height, width = layout.size
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    figure.figimage(canvas(rows, layout, legend, ignore_index), 0, 0, origin='upper')

    def text(left: int, top: int, words: str) -> None:  # pixels from the top left, the text's top left there
        figure.text(left / width, 1 - top / height, words, fontsize=FONT_SIZE, va='top', ha='left')

    for column, title in enumerate(COLUMNS):
        text(layout.left(column), MARGIN, title)
    for number, row in enumerate(rows):
        text(layout.left(0), layout.top(number) - CAPTION_BAND + 5, caption(row, ignore_index))
    text(layout.legend_left, MARGIN, 'classes')
    for line, (_, words) in enumerate(legend):
        text(layout.legend_left + SWATCH + 6, TITLE_BAND + line * LEGEND_LINE, words)
    temporary = f'{path}.tmp{os.getpid()}'  # created with the umask's mode, as every file a run writes
    try:
        figure.savefig(temporary, dpi=DPI, format='png')
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    return layout
