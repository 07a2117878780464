#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then train plain PyTorch
# against gpukernels and compare. Arguments go to `python -m gpukernels.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec "${GPUKERNELS_VENV:-.venv}/bin/python" -m gpukernels.train "$@"
