#!/usr/bin/env bash
# The CPU suite under the releases the GPU machines run (the H200 image, 2026-11: Python 3.12,
# torch 2.11.0, triton 3.6.0, transformers 5.17.0, tokenizers 0.23.2, timm), so that a GPU
# session does not spend its device time on what differs between them and CI's (torch 2.13,
# triton 3.9). numpy<2.4, not the image's 2.5: Triton 3.6's interpreter fails with numpy >= 2.4.
# Not part of CI: torch 2.11 from PyPI is a CUDA build, about 5 GB with its CUDA libraries.
# tests/test_host_time.py is left out: its bounds are counts of CI's releases (this one's are
# in bench/results/host-time-2026-12-02-gpu-machine-versions). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPUKERNELS_GPU_VERSIONS_VENV:-.venv-gpu-versions}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON312:-python3.12}" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, triton, transformers; assert torch.__version__.startswith('2.11.') and triton.__version__ == '3.6.0' and transformers.__version__ == '5.17.0'; import xdist" 2>/dev/null; then
    "$py" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" transformers==5.17.0 tokenizers==0.23.2 timm \
        pytest pytest-xdist tqdm matplotlib
fi
# as on the GPU machine: the working tree on PYTHONPATH, nothing installed
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m pytest -q -ra -p no:cacheprovider -W ignore::DeprecationWarning \
    --deselect tests/test_host_time.py::test_host_time_ratios_within_bounds "$@"
