#!/usr/bin/env bash
# Installs what the tests need (PyPI packages; real photos and Fashion-MNIST from Debian), lints, runs the suite.
# An installed Paddle 3.x is kept; next to a GPU build of Paddle it installs nothing and says to use a virtual
# environment, as torch's CUDA wheels could replace the CUDA runtime that Paddle needs (install_check.py).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m install_check test-environment
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
python -m install_check requirements requirements-test.txt >"$requirements"
python -m pip install -q -r "$requirements"
python -m pip install -q --no-deps DALL-E==0.1  # the tokenizer oracle (see requirements-test.txt)
python -m pip install -q --no-deps openai-clip==1.0.1  # the CLIP teacher's oracle (see requirements-test.txt)
have_photos() { ls tests/photos/*.jpg >/dev/null 2>&1; }
have_fashion_mnist() { [ -d /usr/share/datasets/fashion-mnist ]; }
if [ "$(id -u)" = 0 ] && ! { have_photos && have_fashion_mnist; }; then
    apt-get update -qq
    have_fashion_mnist || apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
have_photos || bash tests/fetch_photos.sh
ruff check .
python -m pytest -q "$@"
