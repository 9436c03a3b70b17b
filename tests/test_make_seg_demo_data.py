"""The embedded segmentation demo set: the committed canvases are what make_seg_demo_data.py makes, their labels
are where the items are drawn, seg_datasets reads them, and the demo config builds a model and samples on them."""
import hashlib
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import make_seg_demo_data as msd
import seg_datasets as sd
from beit import build_beit
from beit_seg import build_beit_upernet, load_backbone_weights
from config import get_config, merge_opts
from helpers import ROOT, write_list
from sample_sources import DatasetError
from seg_inference import segment, settings_from_config

DEMO = ROOT / 'data' / 'fashion_seg'
SOURCE = ROOT / 'data' / 'fashion_mnist'
DEMO_CONFIG = str(ROOT / 'configs' / 'beit_tiny_seg_fashion.yaml')
CLASSIFICATION_DEMO_CONFIG = str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml')
COUNTS = {'train': 600, 'val': 100}
NUM_CLASSES = 11
MAX_SET_BYTES = 5 * 2 ** 20


def file_hashes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob('*')) if path.is_file()}


def labels_of(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == 'P'
        return np.asarray(img)


def square_item(low: int = 7, high: int = 21, level: int = 255) -> np.ndarray:
    """A 28x28 grey item: ``level`` on rows and columns [low, high), 0 elsewhere."""
    grey = np.zeros((28, 28), dtype=np.uint8)
    grey[low:high, low:high] = level
    return grey


def synthetic_source(folder: Path, per_class: int = 2, seed: int = 0) -> Path:
    """A Fashion-MNIST-like demo subset: random 28x28 grey PNGs in list files, 10 classes and a licence."""
    rng = np.random.default_rng(seed)
    (folder / 'classes.txt').parent.mkdir(parents=True, exist_ok=True)
    (folder / 'classes.txt').write_text(''.join(f'class {k}\n' for k in range(10)), encoding='utf-8')
    (folder / 'LICENSE').write_text('MIT licence of the items\n', encoding='utf-8')
    for split in ('train', 'val'):
        lines = []
        for label in range(10):
            for k in range(per_class):
                path = folder / split / f'{label}_{k}.png'
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(path)
                lines.append(f'{split}/{label}_{k}.png {label}')
        write_list(folder / f'{split}_list.txt', lines)
    return folder


@pytest.fixture(scope='module')
def source():
    """The committed Fashion-MNIST subset as the script reads it: (class names, {split: (images, labels)})."""
    return msd.read_source(str(SOURCE))


def demo_config(*opts):
    config = get_config(DEMO_CONFIG)
    merge_opts(config, ['DATA.DATA_PATH', str(DEMO), *opts])
    return config


# ---- the drawing rule ---------------------------------------------------------------------------------------------

def test_an_item_is_drawn_and_labelled_exactly_on_its_pixels_from_the_threshold():
    grey = square_item()
    grey[7, 7], grey[20, 20] = msd.MASK_THRESHOLD - 1, msd.MASK_THRESHOLD  # one corner out, the other in
    image, labels = np.zeros((40, 50, 3)), np.zeros((40, 50), dtype=np.uint8)
    msd.paint(image, labels, msd.Item(source=0, left=12, top=5, size=28, tint=(200, 100, 40)), grey, label=3)
    expected = np.zeros((40, 50), dtype=bool)
    expected[5 + 7:5 + 21, 12 + 7:12 + 21] = True
    expected[5 + 7, 12 + 7] = False
    np.testing.assert_array_equal(labels, np.where(expected, 4, 0))  # class 3 is label 4: 0 is the background
    np.testing.assert_array_equal(image[~expected], 0)  # nothing drawn outside the item
    full = expected.copy()
    full[5 + 20, 12 + 20] = False
    np.testing.assert_array_equal(image[full], np.broadcast_to([200, 100, 40], (full.sum(), 3)))  # grey 255
    shade = msd.MIN_SHADE + (1 - msd.MIN_SHADE) * msd.MASK_THRESHOLD / 255
    np.testing.assert_allclose(image[5 + 20, 12 + 20], np.array([200, 100, 40]) * shade)  # shaded by its grey


def test_a_later_item_covers_an_earlier_one_in_image_and_labels():
    image, labels = np.zeros((30, 30, 3)), np.zeros((30, 30), dtype=np.uint8)
    msd.paint(image, labels, msd.Item(0, 0, 0, 28, (255, 0, 0)), square_item(), label=0)
    msd.paint(image, labels, msd.Item(1, 2, 2, 28, (0, 0, 255)), square_item(), label=9)
    assert labels[9, 9] == 10 and labels[21, 21] == 10 and labels[8, 8] == 1  # (8, 8): only the first covers it
    np.testing.assert_array_equal(image[9, 9], [0, 0, 255])
    np.testing.assert_array_equal(image[8, 8], [255, 0, 0])


def test_an_item_scaled_up_covers_the_scaled_pixels():
    image, labels = np.zeros((60, 60, 3)), np.zeros((60, 60), dtype=np.uint8)
    msd.paint(image, labels, msd.Item(0, 0, 0, 56, (90, 90, 90)), square_item(), label=1)
    rows, cols = np.nonzero(labels)
    # the 14-pixel square doubled: 28 pixels from 14, widened by one blended pixel each side above the threshold
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 42, 13, 42)


def test_canvas_labels_are_where_its_items_are_drawn(source):
    _, splits = source
    images, classes = splits['val']
    for index in range(6):
        canvas = msd.make_canvas(msd.canvas_rng(0, 'val', index), images, classes)
        height, width = canvas.labels.shape
        assert (width, height) in msd.CANVAS_SIZES and canvas.image.shape == (height, width, 3)
        assert msd.ITEMS_PER_CANVAS[0] <= len(canvas.items) <= msd.ITEMS_PER_CANVAS[1]
        expected = np.zeros_like(canvas.labels)
        expected_colour = np.zeros(canvas.image.shape)
        for item in canvas.items:  # in drawing order: a later item covers an earlier one
            assert msd.ITEM_SIZES[0] <= item.size <= msd.ITEM_SIZES[1]
            assert 0 <= item.left <= width - item.size and 0 <= item.top <= height - item.size
            grey = np.asarray(Image.fromarray(images[item.source]).resize((item.size, item.size), Image.BILINEAR))
            mask = grey >= msd.MASK_THRESHOLD
            window = np.s_[item.top:item.top + item.size, item.left:item.left + item.size]
            expected[window][mask] = classes[item.source] + 1
            expected_colour[window][mask] = np.outer(msd.MIN_SHADE + (1 - msd.MIN_SHADE) * grey[mask] / 255,
                                                     item.tint)
        np.testing.assert_array_equal(canvas.labels, expected)
        drawn = expected > 0
        assert drawn.any() and not drawn.all()
        # drawn pixels: the item's colour moved by the noise at most (and clipped to 0..255)
        error = np.abs(canvas.image[drawn] - np.clip(expected_colour[drawn], 0, 255))
        assert error.max() <= msd.NOISE + 0.5


# ---- the script ---------------------------------------------------------------------------------------------------

def test_rerun_is_byte_identical_and_the_seed_matters(tmp_path):
    synthetic_source(tmp_path / 'source')
    args = ['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'out'), '-train_canvases', '4',
            '-val_canvases', '3']
    assert msd.main(args) == 0
    first = file_hashes(tmp_path / 'out')
    assert len([name for name in first if name.startswith('images/training/')]) == 4
    assert msd.main(args) == 0  # replaces its own output
    assert file_hashes(tmp_path / 'out') == first
    assert msd.main([*args, '-seed', '1']) == 0
    second = file_hashes(tmp_path / 'out')
    assert set(second) == set(first)
    assert all(second[name] != first[name] for name in first if name.startswith(('images', 'annotations')))


def test_synthetic_set_reads_with_seg_datasets_and_holds_the_sources_classes(tmp_path):
    synthetic_source(tmp_path / 'source')
    assert msd.main(['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'out'), '-train_canvases', '5',
                     '-val_canvases', '2', '-seed', '3']) == 0
    out = tmp_path / 'out'
    assert (out / 'classes.txt').read_text().splitlines() == ['background', *(f'class {k}' for k in range(10))]
    assert (out / 'LICENSE').read_text() == 'MIT licence of the items\n'
    config = demo_config('DATA.DATA_PATH', str(out))
    pairs, _ = sd.checked_pairs(config, 'train')
    assert [Path(pair.image).name for pair in pairs] == [f'{k:05d}.jpg' for k in range(5)]


def test_bad_source_is_a_clear_error_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / 'out'
    assert msd.main(['-source', str(tmp_path / 'nothing'), '-output', str(out)]) == 2
    assert 'classes.txt not found' in capsys.readouterr().err and not out.exists()
    source = synthetic_source(tmp_path / 'source')
    (source / 'val' / '3_1.png').write_bytes(b'not a png')
    assert msd.main(['-source', str(source), '-output', str(out)]) == 2
    assert f'cannot decode {source / "val" / "3_1.png"}' in capsys.readouterr().err and not out.exists()
    Image.new('L', (28, 27)).save(source / 'val' / '3_1.png')
    assert msd.main(['-source', str(source), '-output', str(out)]) == 2
    assert 'expected a 28x28 grey (L) image, got 28x27 L' in capsys.readouterr().err and not out.exists()
    Image.new('L', (28, 28)).save(source / 'val' / '3_1.png')
    (source / 'classes.txt').write_text('\n'.join(f'class {k}' for k in range(11)) + '\n', encoding='utf-8')
    assert msd.main(['-source', str(source), '-output', str(out)]) == 2
    assert 'names 11 classes; Fashion-MNIST has 10' in capsys.readouterr().err and not out.exists()
    (source / 'classes.txt').write_text('\n'.join(f'class {k}' for k in range(10)) + '\n', encoding='utf-8')
    write_list(source / 'train_list.txt', ['train/0_0.png 0', 'train/missing.png 1'])
    assert msd.main(['-source', str(source), '-output', str(out)]) == 2
    assert 'line 2: file not found' in capsys.readouterr().err and not out.exists()


def test_a_folder_not_made_by_the_script_is_left_alone(tmp_path, capsys):
    source = synthetic_source(tmp_path / 'source')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    assert msd.main(['-source', str(source), '-output', str(tmp_path / 'mine'), '-train_canvases', '1',
                     '-val_canvases', '1']) == 2
    assert 'was not made by this script' in capsys.readouterr().err
    assert [path.name for path in (tmp_path / 'mine').iterdir()] == ['notes.txt']


@pytest.mark.parametrize('flag', ['-train_canvases', '-val_canvases', '-seed'])
def test_counts_and_seed_are_checked(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        msd.main(['-output', str(tmp_path / 'out'), flag, '-1'])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err and not (tmp_path / 'out').exists()


# ---- the committed set --------------------------------------------------------------------------------------------

def test_committed_set_is_what_the_script_makes(tmp_path):
    assert msd.main(['-source', str(SOURCE), '-output', str(tmp_path / 'rebuilt')]) == 0
    assert file_hashes(tmp_path / 'rebuilt') == file_hashes(DEMO)


def test_a_canvas_does_not_depend_on_how_many_are_made(tmp_path):
    assert msd.main(['-source', str(SOURCE), '-output', str(tmp_path / 'few'), '-train_canvases', '3',
                     '-val_canvases', '2']) == 0
    few, committed = file_hashes(tmp_path / 'few'), file_hashes(DEMO)
    canvases = [name for name in few if name.startswith(('images', 'annotations'))]
    assert len(canvases) == 10 and all(few[name] == committed[name] for name in canvases)


def test_committed_set_has_its_files_names_licence_and_stays_small():
    for split, folder in msd.SPLITS.items():
        names = [f'{k:05d}' for k in range(COUNTS[split])]
        assert sorted(path.stem for path in (DEMO / 'images' / folder).iterdir()) == names
        assert sorted(path.stem for path in (DEMO / 'annotations' / folder).iterdir()) == names
    source_names = (SOURCE / 'classes.txt').read_text(encoding='utf-8').splitlines()
    assert (DEMO / 'classes.txt').read_text(encoding='utf-8').splitlines() == ['background', *source_names]
    assert (DEMO / 'LICENSE').read_bytes() == (SOURCE / 'LICENSE').read_bytes()
    readme = (DEMO / 'README.md').read_text(encoding='utf-8')
    assert msd.README_MARKER in readme and 'arXiv:1708.07747' in readme
    assert f'-train_canvases {COUNTS["train"]} -val_canvases {COUNTS["val"]} -seed 0' in readme
    assert {path.name for path in DEMO.iterdir()} == {'images', 'annotations', 'classes.txt', 'LICENSE', 'README.md'}
    assert sum(path.stat().st_size for path in DEMO.rglob('*') if path.is_file()) < MAX_SET_BYTES


@pytest.mark.parametrize('split', ['train', 'val'])
def test_committed_labels_are_in_range_and_every_class_occurs(split):
    folder = DEMO / 'annotations' / msd.SPLITS[split]
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    sizes = set()
    for path in sorted(folder.iterdir()):
        labels = labels_of(path)
        assert labels.max() < NUM_CLASSES
        counts += np.bincount(labels.ravel(), minlength=NUM_CLASSES)
        sizes.add(labels.shape)
    assert (counts > 0).all()
    assert 0.6 < counts[0] / counts.sum() < 0.9  # background: most pixels, not all
    assert len(sizes) >= 2  # evaluation meets images of several sizes


def test_seg_datasets_reads_the_committed_set_with_its_values_checked():
    for split in ('train', 'val'):
        pairs, source = sd.checked_pairs(demo_config(), split)
        assert source == str(DEMO / 'images' / msd.SPLITS[split]) and len(pairs) == COUNTS[split]
    with pytest.raises(DatasetError, match='label values 10 found'):  # the labels do reach class + 1 = 10
        sd.checked_pairs(demo_config('SEG.NUM_CLASSES', '10'), 'val')


# ---- the demo config ----------------------------------------------------------------------------------------------

def test_demo_config_builds_the_model_and_samples_of_the_expected_shapes():
    config = demo_config()
    assert (config.SEG.NUM_CLASSES, config.SEG.REDUCE_ZERO_LABEL) == (NUM_CLASSES, False)
    assert config.SEG.SLIDE_STRIDE < config.DATA.IMAGE_SIZE
    crop, grid = config.DATA.IMAGE_SIZE, config.DATA.IMAGE_SIZE // config.MODEL.PATCH_SIZE
    train = sd.get_seg_dataset(config, 'train')
    train.reseed(0)
    samples = [train[index] for index in range(4)]
    for image, labels in samples:
        assert image.shape == (3, crop, crop) and image.dtype == np.float32
        assert labels.shape == (crop, crop) and labels.dtype == np.int64
        assert set(np.unique(labels)) <= set(range(NUM_CLASSES)) | {255}
    paddle.seed(0)
    model = build_beit_upernet(config)
    model.train()
    main_logits, aux_logits = model(paddle.to_tensor(np.stack([image for image, _ in samples])))
    assert main_logits.shape == [4, NUM_CLASSES, 4 * grid, 4 * grid] and aux_logits.shape == [4, NUM_CLASSES, grid,
                                                                                               grid]
    model.eval()
    val = sd.get_seg_dataset(config, 'val')
    settings = settings_from_config(config)
    for index in (0, 1, 2):
        image, labels = val[index]
        height, width = labels.shape
        assert image.shape == (3, height, width)  # IMG_SCALE leaves every canvas at its size
        prediction = segment(model, lambda shape, image=image: image[None], (height, width), settings)
        assert prediction.shape == [1, height, width]


def test_the_classification_demos_weights_start_the_demo_backbone():
    paddle.seed(0)
    classifier = build_beit(get_config(CLASSIFICATION_DEMO_CONFIG))
    state_dict = {name: tensor.numpy() for name, tensor in classifier.state_dict().items()}
    model = build_beit_upernet(demo_config())
    notes = load_backbone_weights(model, state_dict)
    assert any('freshly initialised' in note for note in notes)
    loaded = model.backbone.state_dict()
    for name in ('patch_embed.proj.weight', 'blocks.3.mlp.fc2.weight', 'cls_token'):
        np.testing.assert_array_equal(loaded[name].numpy(), state_dict[name])
    table = 'blocks.0.attn.relative_position_bias_table'  # resampled from the 4x4 grid of 28-pixel images to 8x8
    assert state_dict[table].shape[0] < loaded[table].shape[0]
