"""Where a split's samples come from, read and checked before training starts: a list file or class folders.

List files (``DATA.DATASET: imagenet2012``) hold one ``relative/path label`` per line. The label is the last
whitespace-separated field, so paths may contain spaces (not leading or trailing ones). Paths are relative to the
data folder (DATA.DATA_PATH); absolute paths are used as they are. Blank lines and lines whose first non-blank
character is ``#`` are ignored, so a listed path cannot start with ``#``; a ``#`` later in a line is part of the
path. Line numbers in messages count every line of the file, from 1.

Class folders (``DATA.DATASET: imagefolder``): ``<split folder>/<class>/...``; a class's index is its position among
the sorted class-folder names.
"""
import os
import re

from errors import BadInputError
from sample_table import SampleTable

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp', '.gif')
MAX_REPORTED_PROBLEMS = 5

_INTEGER = re.compile(r'-?[0-9]+')


class DatasetError(BadInputError):
    """Data that cannot be used; the message names the file (and the list line) to fix."""


def data_root(config) -> str:
    """DATA.DATA_PATH, which must name an existing folder: the root of every split's list or folders."""
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetError('DATA.DATA_PATH is not set: give the folder that holds the data')
    if not os.path.isdir(root):
        raise DatasetError(f'DATA.DATA_PATH not found: {root}')
    return root


def numbered_entries(list_path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that are neither blank nor comments."""
    if not os.path.isfile(list_path):
        raise DatasetError(f'list file not found: {list_path}')
    try:
        with open(list_path, encoding='utf-8-sig') as f:
            lines = f.read().split('\n')  # universal newlines: \r\n and \r are \n here
    except UnicodeDecodeError as err:
        raise DatasetError(f'{list_path}: not UTF-8 text ({err})') from err
    return [(number, text) for number, text in enumerate(map(str.strip, lines), 1) if text and text[0] != '#']


def _parse_entry(text: str, num_classes: int | None) -> tuple[tuple[str, int] | None, str]:
    """(relative path, label) of one list line, or the reason it cannot be used; ``num_classes`` None accepts any
    label. Whether the file exists is checked afterwards, a folder at a time. (Runs 1.28M times for ImageNet:
    the common plain-digits label skips the regular expression.)"""
    fields = text.rsplit(None, 1)
    if len(fields) < 2:
        return None, f'no label after the path: {text!r}'
    relative_path, label_text = fields
    if not (label_text.isascii() and label_text.isdecimal()) and not _INTEGER.fullmatch(label_text):
        return None, f'label {label_text!r} is not an integer'
    label = int(label_text)
    if num_classes is not None and not 0 <= label < num_classes:
        return None, f'label {label} outside [0, {num_classes}) (MODEL.NUM_CLASSES)'
    return (relative_path, label), ''


def _files_in(folder: str) -> frozenset:
    """Names of the regular files (links followed) in ``folder``: one directory read instead of a stat per file."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries if entry.is_file())
    except OSError:  # missing, not a folder, unreadable: none of its files can be read
        return frozenset()


def _missing_files(root: str, entries: list[tuple[int, str, int]]) -> list[int]:
    """Indices into ``entries`` (line, relative path, label) whose file does not exist under ``root``."""
    listings = {}
    missing = []
    for index, (_, relative_path, _) in enumerate(entries):
        folder, separator, name = relative_path.rpartition('/')
        names = listings.get(folder + separator)
        if names is None:
            names = listings[folder + separator] = _files_in(os.path.join(root, folder + separator))
        if name not in names:
            missing.append(index)
    return missing


def _parsed_entries(list_path: str, num_classes: int | None) -> tuple[list, list]:
    """([(line, relative path, label)], [(line, problem)]) of a list file."""
    entries, problems = [], []
    for number, text in numbered_entries(list_path):
        entry, problem = _parse_entry(text, num_classes)
        if problem:
            problems.append((number, problem))
        else:
            entries.append((number, *entry))
    return entries, problems


def validate_list_file(list_path: str, root: str, num_classes: int | None) -> SampleTable:
    """The samples of a list file, checked line by line before training starts.

    All lines are checked, so one DatasetError reports the total and the first offenders with their line numbers
    instead of failing hours into a run on the first one.
    """
    entries, problems = _parsed_entries(list_path, num_classes)
    missing = _missing_files(root, entries)
    problems += [(entries[i][0], f'file not found: {os.path.join(root, entries[i][1])}') for i in missing]
    if problems:
        shown = [f'line {number}: {problem}' for number, problem in sorted(problems)[:MAX_REPORTED_PROBLEMS]]
        raise DatasetError(f'{list_path}: {len(problems)} of {len(problems) + len(entries) - len(missing)} entries '
                           f'are unusable; the first {len(shown)}:\n  ' + '\n  '.join(shown))
    if not entries:
        raise DatasetError(f'{list_path}: no samples (only blank or comment lines)')
    return SampleTable.from_entries(root, entries)


def _image_files(folder: str) -> list[str]:
    """Image files anywhere under ``folder`` (links followed), in a stable sorted order."""
    found = []
    for parent, subfolders, names in os.walk(folder, followlinks=True):
        subfolders.sort()
        found += [os.path.join(parent, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_image_folder(folder: str, num_classes: int | None) -> SampleTable:
    """The samples of ``folder/<class>/...``, labelled by the sorted position of the class name.

    The number of class folders must equal ``num_classes`` (a class may have an empty folder): otherwise a class
    missing from one split would shift every later index and train and val would disagree silently. None (labels
    unused) accepts any number. Hidden folders (``.name``) are not classes.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f'image folder not found: {folder}')
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))
    if num_classes is not None and len(classes) != num_classes:
        raise DatasetError(f'{folder}: {len(classes)} class folders, but MODEL.NUM_CLASSES is {num_classes}')
    entries = [(0, os.path.relpath(path, folder), label)
               for label, name in enumerate(classes) for path in _image_files(os.path.join(folder, name))]
    if not entries:
        raise DatasetError(f'{folder}: no image files ({" ".join(IMAGE_EXTENSIONS)}) in its class folders')
    return SampleTable.from_entries(folder, entries)
