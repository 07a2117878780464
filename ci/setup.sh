#!/usr/bin/env bash
# Create or reuse the virtual environment and install gpukernels into it.
# torch==2.13.0 (the CPU build on this kind of machine) is installed only when
# no torch imports: a machine's own torch (a GPU machine's CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPUKERNELS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    # System site-packages stay visible so a torch installed machine-wide is reused.
    python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
fi
stamp="$venv/.gpukernels-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$py" -c "import gpukernels" 2>/dev/null; then
    "$py" -m pip install -q -e ".[test,train,bench]"
    touch "$stamp"
fi
