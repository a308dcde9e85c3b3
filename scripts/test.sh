#!/usr/bin/env bash
# The README's second command: set up (Python packages, and Xvfb where we may install it),
# then run the whole test suite under a virtual X server so napari can draw layers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v Xvfb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 \
            libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0 \
            libgl1 libegl1 libfontconfig1 libdbus-1-3 >/dev/null
    fi
fi
if ! command -v Xvfb >/dev/null 2>&1; then
    echo "scripts/test.sh: Xvfb is not installed and could not be installed here; napari's" \
         "viewer tests need an X server. Install it (Debian/Ubuntu: sudo apt-get install" \
         "xvfb libxcb-icccm4 libxcb-keysyms1) and run again." >&2
    exit 1
fi
scripts/setup.sh "minilm,qt,test"
export CPS4_TORCH_THREADS="${CPS4_TORCH_THREADS:-2}"
exec .venv/bin/python -m pytest -p xvfb --xvfb-backend=xvfb "$@"
