#!/usr/bin/env bash
# The test command: set up (or reuse) the environment, then run the suite, on
# every core (pytest-xdist; GPUKERNELS_TEST_WORKERS=N for N workers, 0 for none).
# Extra arguments go to pytest (e.g. `ci/test.sh -m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
py="${GPUKERNELS_VENV:-.venv}/bin/python"
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n "${GPUKERNELS_TEST_WORKERS:-auto}")
exec "$py" -m pytest -q -ra --durations=10 "${workers[@]}" "$@"
