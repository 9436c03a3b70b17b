#!/usr/bin/env bash
# Installs what the tests need (PyPI packages, real photos from Debian), then lints and runs the suite.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -r requirements-test.txt
if ! ls tests/photos/*.jpg >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && apt-get update -qq
    bash tests/fetch_photos.sh
fi
ruff check .
python -m pytest -q "$@"
