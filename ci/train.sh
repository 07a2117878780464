#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then train a small GPT-2
# (transformers' GPT2LMHeadModel, the cpu preset) in every available way and
# print the comparison table. Arguments go to `python -m gpukernels.train`
# after these defaults and override them (e.g. `--model llama --preset gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec "${GPUKERNELS_VENV:-.venv}/bin/python" -m gpukernels.train --model gpt2 --preset cpu "$@"
