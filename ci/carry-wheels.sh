#!/usr/bin/env bash
# The packages the benchmark compares against that the GPU machine's image lacks, made
# here for a GPU session to carry there (nothing downloads on that machine):
#   .whl/          liger-kernel, and QuACK with the needs of it the image lacks (its image
#                  has torch, triton, einops, protobuf, cuda-bindings); about 10 MiB
#   .whl-cutlass/  nvidia-cutlass-dsl-libs-cu13, QuACK's compiler (a 92 MB wheel, 237 MB
#                  unpacked), as one xz archive of its files, about 60 MiB. A device call
#                  carries at most 64 MiB with the working tree, so it goes alone, in a
#                  first call (with steps that need neither: the GPU tests).
# ci/gpu-check.sh unpacks and installs whatever of them a call carries into .site/, which
# stays there between calls while the machine is warm. The three folders are git-ignored.
# The CUDA 13 build of the compiler, for the image's CUDA 13 torch.
#   bash ci/carry-wheels.sh          (then: a call carrying .whl-cutlass, then calls carrying .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_VERSION:-0.8.5}
QUACK=${QUACK_VERSION:-0.6.5}
CUTLASS=${CUTLASS_DSL_VERSION:-4.8.1}
download() {  # download FOLDER NAME==VERSION...: wheels for the GPU machine's Python 3.12 on x86-64
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}
rm -rf .whl .whl-cutlass
mkdir -p .whl .whl-cutlass
download .whl "liger-kernel==$LIGER" "quack-kernels==$QUACK" "nvidia-cutlass-dsl==$CUTLASS" \
    "nvidia-cutlass-dsl-libs-base==$CUTLASS" "nvidia-cutlass-dsl-libs-core==$CUTLASS" \
    "apache-tvm-ffi>=0.1.6,<0.2" torch-c-dlpack-ext
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download "$work" "nvidia-cutlass-dsl-libs-cu13==$CUTLASS"
mkdir "$work/files"
python3 -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl "$work/files"
tar cf - -C "$work/files" . | xz -9 -T0 > .whl-cutlass/nvidia-cutlass-dsl-libs-cu13.tar.xz
du -sh .whl .whl-cutlass
