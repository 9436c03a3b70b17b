"""Decoding image files: the one reader of the datasets, predict.py and the tests, so a file that one of them
refuses, all of them refuse."""
from PIL import Image, ImageFile

from transforms import to_rgb

# A truncated file must fail to decode, not become a picture with a grey bottom.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# What PIL raises for a file it cannot decode.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def load_rgb_image(path: str) -> Image.Image:
    """Decode the whole file now (``load``), so a truncated or corrupt image fails here and not in a transform."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header, nothing decoded: what load_rgb_image will give (no EXIF rotation)."""
    with Image.open(path) as img:
        return img.height, img.width
