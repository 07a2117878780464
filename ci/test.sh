#!/usr/bin/env bash
# The test command: set up (or reuse) the environment, then run the suite.
# Extra arguments go to pytest (e.g. `ci/test.sh -m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec "${GPUKERNELS_VENV:-.venv}/bin/python" -m pytest -q -ra --durations=10 "$@"
