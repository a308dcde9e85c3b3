#!/usr/bin/env bash
# The README's first command: set up, then run the whole CPS4 pipeline on synthetic data
# (synthesise -> stage 1 -> stage 2 -> predict -> evaluate -> report). Extra arguments go
# to `cps4 demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "minilm,qt"
exec .venv/bin/cps4 demo "$@"
