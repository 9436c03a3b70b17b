"""What the scripts that build the embedded demo sets share: an output folder each may replace only when it made
it, and text written the same way on every platform (so a rebuild gives the same bytes).

Imports nothing heavy, so make_demo_data.py runs without Paddle.
"""
import os
import shutil

from errors import BadInputError


class SourceError(BadInputError):
    """Source files that are missing, malformed or too small for the requested set, or an output folder that the
    script may not replace."""


def write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)


def made_by(output: str, marker: str) -> bool:
    """Whether ``output``'s README.md holds ``marker`` (the line a build script writes into it)."""
    readme = os.path.join(output, 'README.md')
    if not os.path.isfile(readme):
        return False
    with open(readme, encoding='utf-8') as f:
        return marker in f.read()


def prepare_output(output: str, marker: str) -> None:
    """An empty output folder; a previous output of the script that writes ``marker`` is replaced, any other
    folder is left alone."""
    if os.path.isdir(output) and os.listdir(output):
        if not made_by(output, marker):
            raise SourceError(f'{output} exists and was not made by this script; choose another -output')
        shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)
