#!/usr/bin/env bash
# GPU verification in one call, each step under its own time limit; installs
# nothing from the network.
#   bash ci/gpu-check.sh [folder]      (default: $OUT when set, else out/gpu-check)
#   GPU_CHECK_DRY_RUN=1 bash ci/gpu-check.sh   (the plan: each step's command and limit; no GPU needed)
# Steps, from the working tree (PYTHONPATH=.) on the machine's own torch/triton:
#   tests    the GPU test tier (pytest -m gpu, in parallel when pytest-xdist is there)
#   profile  where ours' and eager's forward+backward time goes (bench --profile)
#   bench    a quick benchmark of every op against its baselines (torch.compile
#            max-autotune left out: its autotuning takes minutes per op)
#   graph    the memory-bound ops again, timed by CUDA graph replays (the GPU's
#            time without the host's launch overhead), against eager, Liger, CuPy
#   targets  the ops with performance targets (layer_norm, batch_norm, dropout, cross_entropy,
#            linear_cross_entropy)
#            at their target shapes, one CUDA graph replay a call with L2 flushed before
#            each, every target met or not (bench --targets); Liger-Kernel where installed
#   compile  each op inside torch.compile, ours (Inductor launching our Triton
#            kernels) against Inductor's own kernels for the PyTorch op (bench --compile)
#   train    the gpu preset of the digits MLP
#   models   a real model's training step, every way (plain, patched, captured, Liger, compiled):
#            the gpu preset of gpt2, llama and resnet50 (GPU_CHECK_MODELS picks them, qwen3 and
#            gemma3 too) for
#            GPU_CHECK_TRAIN_STEPS steps each (default 30), then one profiled step of each way
#            (its kernels by origin against its wall time)
#   host     host time per call of every op, ours against eager, and of each piece of an op's
#            launch (python -m bench.host_overhead)
# Packages carried from ci/carry-wheels.sh (.whl/ and .whl-cutlass/, each named in the call's
# carry) are unpacked and installed into .site/ first, which later calls on a warm machine
# find there (it goes back after 30 s idle: call again at once). .whl-cutlass fills a call's
# 64 MiB with the tree, so carry it alone in a first call whose steps need neither (tests),
# then .whl in the next, with the steps that compare against Liger and QuACK (targets, bench).
# GPU_CHECK_STEPS picks them (default "tests bench graph compile"); GPU_CHECK_BENCH_SKIP the
# providers the benchmark leaves out (default compile-max), GPU_CHECK_BENCH_OPS its ops (default
# all), GPU_CHECK_BENCH_FULL=1 every shape instead of --quick's one (AdamW: 10M, 100M and 1B
# parameters, the clip+AdamW target's 100M and 1B); GPU_CHECK_LIMIT_<step> a step's
# time limit in seconds (GPU_CHECK_LIMIT_targets=120; a model's: GPU_CHECK_LIMIT_gpt2=150);
# GPU_CHECK_TESTS_K a pytest -k selection of the GPU tests; GPU_CHECK_TRAIN_WAYS the models'
# ways (GPU_CHECK_TRAIN_WAYS_<model> one model's); GPU_CHECK_TARGET_OPS the ops of the targets
# step. With "models" among the steps, the language models' tokenizers are trained in the
# background from the start (CPU work, while the steps before "models" run; the models step
# waits for them, since they would slow the host side of every timed step).
# After each step everything so far is packed into <folder>/gpu-check.tgz, so a run cut short
# still returns what it measured; the files themselves follow at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:-${OUT:-out/gpu-check}}
py=${PYTHON:-python3}
# GPU_CHECK_DRY_RUN=1: each step's command and time limit as this call's knobs make them, and
# nothing run (no GPU needed): a plan checked here before it spends device time
dry=${GPU_CHECK_DRY_RUN:-}
if [ -z "$dry" ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA GPU is visible to torch (through $py); this check needs one" >&2
    exit 2
fi
work=$(mktemp -d)
[ -n "$dry" ] || mkdir -p "$dest"
# Carried packages: pip installs .whl's into .site/packages; the CUTLASS DSL compiler's files
# (nvidia_cutlass_dsl/, which other wheels of it fill too, and pip --upgrade replaces whole)
# are kept in .site/cutlass and copied over them after an unpack or an install (a call that
# carries neither finds them in place)
site=$PWD/.site/packages
carried=
if [ -z "$dry" ] && compgen -G ".whl-cutlass/*.tar.xz" > /dev/null; then
    carried=1
    rm -rf .site/cutlass && mkdir -p .site/cutlass && tar xJf .whl-cutlass/*.tar.xz -C .site/cutlass \
        || echo "gpu-check: could not unpack .whl-cutlass" >&2
fi
if [ -z "$dry" ] && compgen -G ".whl/*.whl" > /dev/null; then
    carried=1
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || echo "gpu-check: could not install .whl" >&2
fi
[ -n "$carried" ] && [ -d .site/cutlass ] && mkdir -p "$site" && cp -a .site/cutlass/. "$site"/
# CUTLASS's DSL puts its packages on the path from a .pth file, which only site directories run
extra_path=$( [ -d "$site" ] && echo ":$site:$site/nvidia_cutlass_dsl/dsl_packages" )
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}$extra_path" PYTHONUNBUFFERED=1 GPUKERNELS_FAILURE_LOG="$work/failures.log"
unset TRITON_INTERPRET
status=0
publish() {  # everything so far, packed into one file in $dest (the device tool returns 8 files at most)
    tar czf "$dest/gpu-check.tgz" -C "$work" .
}
limit() {  # limit STEP DEFAULT: the step's time limit, GPU_CHECK_LIMIT_<STEP> when set
    local var="GPU_CHECK_LIMIT_$1"
    echo "${!var:-$2}"
}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $work/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if [ -n "$dry" ]; then
        echo "   limit ${limit} s (dry run: not run)"
        return
    fi
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$work/$name.log"
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
    publish
}
if [ -z "$dry" ]; then
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        "$py" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
        "$py" -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
        "$py" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
        "$py" -c "import importlib.metadata as m; from quack.rmsnorm import layernorm_fwd; print('quack-kernels', m.version('quack-kernels'))" 2>&1 | tail -1
    } > "$work/environment.txt" 2>&1
    cat "$work/environment.txt"
fi
tokens_pid=
models=" ${GPU_CHECK_MODELS:-gpt2 llama resnet50} "
language_models=$(for m in gpt2 llama qwen3 gemma3; do [[ $models == *" $m "* ]] && echo -n "'$m',"; done)
if [[ -z $dry && " ${GPU_CHECK_STEPS:-} " == *" models "* && -n $language_models ]]; then  # CPU work, overlapping the GPU steps before it
    "$py" -c "from gpukernels.train import data, presets
for model in ($language_models):
    cfg = presets.PRESETS[model]['gpu']
    print(model, data.stdlib_tokens(cfg['vocab'], cfg['corpus_bytes'], data.default_cache_dir()).describe())
" > "$work/tokenizers.log" 2>&1 &
    tokens_pid=$!
fi
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 14)
bench_size=(--quick)
[ "${GPU_CHECK_BENCH_FULL:-}" = 1 ] && bench_size=()
for name in ${GPU_CHECK_STEPS:-tests bench graph compile}; do
    case $name in
        tests) step gpu-tests $(limit tests 240) "$py" -m pytest -m gpu -q -ra -p no:cacheprovider --durations=25 "${parallel[@]}" \
                   ${GPU_CHECK_TESTS_K:+-k "$GPU_CHECK_TESTS_K"} tests ;;
        profile) step profile $(limit profile 120) "$py" -m bench --profile --quick --out "$work/profile" ;;
        bench) step bench $(limit bench 240) "$py" -m bench "${bench_size[@]}" --skip "${GPU_CHECK_BENCH_SKIP-compile-max}" \
                   ${GPU_CHECK_BENCH_OPS:+--ops "$GPU_CHECK_BENCH_OPS"} --out "$work/bench" ;;
        graph) step bench-graph $(limit graph 120) "$py" -m bench --quick --cuda-graph --skip compile,compile-max \
                   --ops layer_norm,cross_entropy,dropout,batch_norm,batch_norm_relu,batch_norm_add_relu,rope,gated_act,linear_act \
                   --out "$work/bench-graph" ;;
        targets) step bench-targets $(limit targets 420) "$py" -m bench --targets --quick --skip cupy \
                   ${GPU_CHECK_TARGET_OPS:+--ops "$GPU_CHECK_TARGET_OPS"} --out "$work/bench-targets" ;;
        compile) step bench-compile $(limit compile 240) "$py" -m bench --quick --compile --out "$work/compile" ;;
        train) step train-mlp $(limit train 150) "$py" -m gpukernels.train --model mlp --preset gpu --steps 30 --out "$work/train" ;;
        models) # the tokenizers' training would take CPU time from the timed steps' host side
                if [ -n "$tokens_pid" ]; then
                    wait "$tokens_pid"
                    tokens_pid=
                fi
                for model in $models; do
                    ways_var="GPU_CHECK_TRAIN_WAYS_$model"
                    ways=${!ways_var:-${GPU_CHECK_TRAIN_WAYS:-}}
                    step "train-$model" "$(limit "$model" "$(limit models 200)")" "$py" -m gpukernels.train --model "$model" --preset gpu \
                        --steps "${GPU_CHECK_TRAIN_STEPS:-30}" ${ways:+--ways "$ways"} \
                        --profile --out "$work/train-$model"
                done ;;
        host) step host-overhead $(limit host 120) "$py" -m bench.host_overhead ;;
        *) echo "gpu-check: unknown step $name (tests, profile, bench, graph, targets, compile, train, models, host)" >&2
           exit 2 ;;
    esac
done
if [ -n "$dry" ]; then
    rm -rf "$work"
    echo "gpu-check: dry run, nothing run (exit $status)"
    exit $status
fi
if [ -z "${OUT:-}" ] || [ "$dest" != "$OUT" ]; then
    cp -r "$work"/. "$dest"/
fi
echo "gpu-check: results in $dest (exit $status)"
exit $status
