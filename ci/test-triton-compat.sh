#!/usr/bin/env bash
# Under the Triton release the GPU machines run (3.6), beside the newest one
# the main suite uses: the Triton-interpreter tier again, then every kernel
# variant compiled for an H100 (sm_90) by ci/compile_sm90.py, which needs no
# GPU. Its own virtual environment: torch==2.13.0 (CPU), triton==3.6.0, and
# numpy<2.4 (triton 3.6's interpreter fails with numpy >= 2.4).
# `ci/test-triton-compat.sh --setup` makes the environment only (.ci/run makes it
# beside the main one).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPUKERNELS_COMPAT_VENV:-.venv-triton36}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, triton, pytest, xdist; assert triton.__version__.startswith('3.6')" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest pytest-xdist tqdm
fi
if [ "${1:-}" = "--setup" ]; then
    exit 0
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m pytest -q -m interpreter -p no:cacheprovider -W ignore::DeprecationWarning \
    -n "${GPUKERNELS_TEST_WORKERS:-auto}" "$@" tests
TRITON_CACHE_DIR=$(mktemp -d) exec "$py" -W ignore ci/compile_sm90.py
