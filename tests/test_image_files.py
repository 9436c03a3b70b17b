"""image_files.py: a file decodes whole into RGB, or fails with one of DECODE_ERRORS (a truncated file too)."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_files import DECODE_ERRORS, image_size, load_rgb_image


def _noise_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_the_whole_file_is_decoded_before_it_is_closed(tmp_path):
    """The pixels are there after the file is gone: nothing is left to decode lazily from a closed file."""
    path = str(_noise_jpeg(tmp_path / 'a.jpg'))
    with Image.open(path) as img:
        expected = np.asarray(img.convert('RGB'))
    image = load_rgb_image(path)
    os.remove(path)
    assert image.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_other_modes_come_back_as_rgb(tmp_path):
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / 'grey.png')
    np.testing.assert_array_equal(np.asarray(load_rgb_image(str(tmp_path / 'grey.png'))),
                                  [[(0, 0, 0), (128, 128, 128), (255, 255, 255)]])


@pytest.mark.parametrize(('kind', 'message'), [('truncated', 'image file is truncated'),
                                               ('empty', 'cannot identify image file'),
                                               ('text', 'cannot identify image file')])
def test_a_file_that_does_not_decode_raises_a_decode_error(tmp_path, kind, message):
    whole = _noise_jpeg(tmp_path / 'whole.jpg').read_bytes()
    data = {'truncated': whole[:-10], 'empty': b'', 'text': b'this is not a picture\n'}[kind]
    (tmp_path / 'bad.jpg').write_bytes(data)
    with pytest.raises(DECODE_ERRORS, match=message):
        load_rgb_image(str(tmp_path / 'bad.jpg'))


def test_image_size_reads_the_header_as_the_decoded_image_is(tmp_path):
    """(height, width) without decoding: a file whose body is cut still gives the size its header states."""
    path = tmp_path / 'wide.png'
    Image.new('RGB', (7, 3)).save(path)
    assert image_size(str(path)) == (3, 7) == np.asarray(load_rgb_image(str(path))).shape[:2]
    (tmp_path / 'cut.png').write_bytes(path.read_bytes()[:60])
    assert image_size(str(tmp_path / 'cut.png')) == (3, 7)
