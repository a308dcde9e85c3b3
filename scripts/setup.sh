#!/usr/bin/env bash
# Set-up shared by the README's two commands: a virtual environment in .venv with the
# CPU build of torch installed first (a bare `torch` requirement would pull a multi-GB
# CUDA build), then the package in editable mode with its extras.
# Usage: scripts/setup.sh [EXTRAS]     e.g. scripts/setup.sh "minilm,qt,test"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-minilm,qt}"
python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "napari-cps4 needs Python 3.10 or newer; $python_bin is $("$python_bin" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
stamp=".venv/.cps4-installed-$extras"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        .venv/bin/python -m pip install -q "torch==2.13.0" \
            || .venv/bin/python -m pip install -q "torch>=2.2"
    fi
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi
