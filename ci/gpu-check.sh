#!/usr/bin/env bash
# GPU verification, under 8 minutes on an H100; installs nothing from the network.
#   bash ci/gpu-check.sh [folder]      (default: $OUT when set, else out/gpu-check)
# Runs the GPU test tier (pytest -m gpu), a quick benchmark of every op against
# its baselines, and the large training preset, from the working tree
# (PYTHONPATH=.) on the machine's own torch/triton. Logs, results and plots go
# to a work folder; when $OUT is set (the device machine), they are also packed
# into $OUT/gpu-check.tgz beside the logs, since only a few files come back.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:-${OUT:-out/gpu-check}}
py=${PYTHON:-python3}
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA GPU is visible to torch (through $py); this check needs one" >&2
    exit 2
fi
work=$(mktemp -d)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $work/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$work/$name.log"
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$py" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
    "$py" -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
} > "$work/environment.txt" 2>&1
cat "$work/environment.txt"
step gpu-tests 240 "$py" -m pytest -m gpu -q -ra -p no:cacheprovider tests
step bench 240 "$py" -m gpukernels.bench --quick --out "$work/bench"
step train-large 150 "$py" -m gpukernels.train --preset large --epochs 3 --out "$work/train"
mkdir -p "$dest"
if [ -n "${OUT:-}" ] && [ "$dest" = "$OUT" ]; then
    cp "$work"/*.log "$work/environment.txt" "$dest"/
    tar czf "$dest/gpu-check.tgz" -C "$work" .
else
    cp -r "$work"/. "$dest"/
fi
echo "gpu-check: results in $dest (exit $status)"
exit $status
