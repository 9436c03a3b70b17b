"""sample_sources.py: list files and their checks (every unusable line reported with its number), class
folders."""
import pytest

from helpers import save_rgb, write_list
from sample_sources import DatasetError, scan_image_folder, validate_list_file
from sample_table import Sample

# ---- list files -------------------------------------------------------------------------------------------------

def test_label_is_the_last_field_and_paths_keep_their_spaces(tmp_path):
    for name in ('a b/c  d.png', 'e.png', 'f g.png'):
        save_rgb(tmp_path / name, 0)
    list_path = tmp_path / 'val_list.txt'
    list_path.write_bytes('\ufeff# a comment\r\na b/c  d.png 2\r\n\r\n  e.png\t\t0  \r\n   # indented comment\r\n'
                          'f g.png    1'.encode())
    samples = validate_list_file(str(list_path), str(tmp_path), 3)
    assert list(samples) == [Sample(str(tmp_path / 'a b/c  d.png'), 2, 2), Sample(str(tmp_path / 'e.png'), 0, 4),
                       Sample(str(tmp_path / 'f g.png'), 1, 6)]


def test_absolute_paths_are_used_as_they_are(tmp_path):
    image = save_rgb(tmp_path / 'elsewhere' / 'x.png', 0)
    (tmp_path / 'data').mkdir()
    list_path = write_list(tmp_path / 'data' / 'val_list.txt', [f'{image} 1'])
    assert list(validate_list_file(list_path, str(tmp_path / 'data'), 3)) == [Sample(str(image), 1, 1)]


def test_unusable_lines_are_reported_with_line_numbers_and_total(tmp_path):
    save_rgb(tmp_path / 'ok.png', 0)
    list_path = write_list(tmp_path / 'train_list.txt', [
        'ok.png 0',            # 1
        'no_label.png',        # 2
        '',                    # 3
        'ok.png x7',           # 4
        'ok.png 3',            # 5
        'ok.png -1',           # 6
        'missing file.png 0',  # 7
        '# ok.png 9',          # 8
        'ok.png 2',            # 9
        'ok.png 1.0',          # 10: the sixth problem, counted but not shown
    ])
    with pytest.raises(DatasetError) as info:
        validate_list_file(list_path, str(tmp_path), 3)
    assert str(info.value) == (
        f'{list_path}: 6 of 8 entries are unusable; the first 5:\n'
        "  line 2: no label after the path: 'no_label.png'\n"
        "  line 4: label 'x7' is not an integer\n"
        '  line 5: label 3 outside [0, 3) (MODEL.NUM_CLASSES)\n'
        '  line 6: label -1 outside [0, 3) (MODEL.NUM_CLASSES)\n'
        f'  line 7: file not found: {tmp_path / "missing file.png"}')


def test_an_empty_list_is_an_error(tmp_path):
    list_path = write_list(tmp_path / 'val_list.txt', ['', '# nothing here', '   '])
    with pytest.raises(DatasetError) as info:
        validate_list_file(list_path, str(tmp_path), 3)
    assert str(info.value) == f'{list_path}: no samples (only blank or comment lines)'


def test_a_list_that_is_not_utf8_is_an_error(tmp_path):
    list_path = tmp_path / 'val_list.txt'
    list_path.write_bytes(b'caf\xe9.png 0\n')
    with pytest.raises(DatasetError, match=f'^{list_path}: not UTF-8 text'):
        validate_list_file(str(list_path), str(tmp_path), 3)


# ---- image folders ----------------------------------------------------------------------------------------------

def test_image_folder_needs_one_folder_per_class_and_some_images(tmp_path):
    (tmp_path / 'val/a').mkdir(parents=True)
    (tmp_path / 'val/b').mkdir()
    with pytest.raises(DatasetError) as info:
        scan_image_folder(str(tmp_path / 'val'), 3)
    assert str(info.value) == f'{tmp_path / "val"}: 2 class folders, but MODEL.NUM_CLASSES is 3'
    with pytest.raises(DatasetError, match=f'^{tmp_path / "val"}: no image files'):
        scan_image_folder(str(tmp_path / 'val'), 2)
    with pytest.raises(DatasetError) as info:
        scan_image_folder(str(tmp_path / 'train'), 2)
    assert str(info.value) == f'image folder not found: {tmp_path / "train"}'
