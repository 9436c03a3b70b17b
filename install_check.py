"""What run_demo.sh and run_tests.sh install and start, decided here so that tests can check it.

    python -m install_check requirements FILE...   # the requirement lines to pip-install (-r includes expanded)
    python -m install_check test-environment       # exit 2 (and why) where the torch reference must not go
    python -m install_check demo-processes         # the demo's default process count

Paddle's CPU build (`paddlepaddle`) and its GPU build (`paddlepaddle-gpu`) install into the same `paddle/` folder,
so pip-installing `paddlepaddle` silently replaces a GPU build: an importable Paddle 3.x is therefore kept. Torch
from PyPI brings its own CUDA runtime wheels (CUDA 13 for torch 2.14.1), which may replace the ones a GPU Paddle
needs: the tests' torch reference goes only where the Paddle is a CPU build (or none yet).
"""
import os
import re
import sys
import warnings

from errors import EXIT_BAD_INPUT

EXIT_REFUSED = EXIT_BAD_INPUT  # errors.py imports nothing: this module runs before Paddle is installed
PADDLE_DISTRIBUTIONS = ('paddlepaddle', 'paddlepaddle-gpu')
CPU_DEMO_PROCESSES = 2
TEST_VENV_HINT = ('python3 -m venv .venv-tests && PATH="$PWD/.venv-tests/bin:$PATH" bash run_tests.sh  '
                  '(CPU Paddle and torch there, the GPU Paddle here untouched)')


def installed_paddle():
    """The importable paddle module, or None when there is none to keep."""
    try:
        with warnings.catch_warnings():  # Paddle warns on import that no ccache is installed: not news here
            warnings.simplefilter('ignore')
            import paddle
    except ImportError:
        return None
    return paddle


def is_gpu_build(paddle) -> bool:
    return paddle.device.is_compiled_with_cuda()


def keeps_paddle(paddle) -> bool:
    """Whether an installed Paddle stays: any 3.x build (0.0.0 is a develop build). A 2.x GPU build cannot run
    this code and must not be swapped for the CPU build either: stop and say what to install."""
    version = paddle.__version__
    if version.split('.')[0] == '3' or version == '0.0.0':
        return True
    if is_gpu_build(paddle):
        print(f'error: Paddle {version} (a GPU build) is installed; this code needs Paddle 3.x: install '
              'paddlepaddle-gpu 3.x from Paddle\'s package index (README, "Install"), then run this again',
              file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)
    return False


def requirement_name(line: str) -> str:
    match = re.match(r'[A-Za-z0-9][A-Za-z0-9._-]*', line)
    return re.sub(r'[-_.]+', '-', match.group(0)).lower() if match else ''


def requirement_lines(path: str) -> list[str]:
    """The requirements of ``path`` without comments, ``-r`` includes read in place (relative to the file)."""
    lines = []
    with open(path) as f:
        for raw in f:
            line = re.split(r'(?:^|\s)#', raw)[0].strip()
            include = re.match(r'(?:-r|--requirement)[\s=]*(\S+)$', line)
            if include:
                lines += requirement_lines(os.path.join(os.path.dirname(path), include.group(1)))
            elif line:
                lines.append(line)
    return lines


def requirements_to_install(paths: list[str]) -> list[str]:
    """Every requirement of ``paths``, less Paddle when an installed Paddle is kept."""
    lines = [line for path in paths for line in requirement_lines(path)]
    paddle = installed_paddle()
    if paddle is not None and keeps_paddle(paddle):
        lines = [line for line in lines if requirement_name(line) not in PADDLE_DISTRIBUTIONS]
    return lines


def check_test_environment() -> int:
    """0 where the tests may install torch; EXIT_REFUSED (and what to run) next to a GPU build of Paddle."""
    paddle = installed_paddle()
    if paddle is None or not is_gpu_build(paddle):
        return 0
    print('error: a GPU build of Paddle is installed here; the tests install torch from PyPI, whose CUDA runtime '
          'wheels could replace the ones it needs. Run the tests in their own virtual environment:\n    '
          + TEST_VENV_HINT, file=sys.stderr)
    return EXIT_REFUSED


def visible_gpus() -> int:
    """GPUs the Paddle here can use (CUDA_VISIBLE_DEVICES applies), as cli.process_count counts them; 0 for a CPU
    build."""
    paddle = installed_paddle()
    return paddle.device.cuda.device_count() if paddle is not None and is_gpu_build(paddle) else 0


def demo_processes() -> int:
    """One process per visible GPU; without a GPU, CPU_DEMO_PROCESSES processes over gloo."""
    return visible_gpus() or CPU_DEMO_PROCESSES


def main(argv: list[str]) -> int:
    command, *paths = argv or ['']
    if command == 'requirements' and paths:
        print('\n'.join(requirements_to_install(paths)))
        return 0
    if command == 'test-environment' and not paths:
        return check_test_environment()
    if command == 'demo-processes' and not paths:
        print(demo_processes())
        return 0
    print('usage:\n' + '\n'.join(__doc__.splitlines()[2:5]), file=sys.stderr)
    return EXIT_REFUSED


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
