#!/usr/bin/env bash
# Compile-check fishkern's CUDA kernels (csrc/*.cu) with plain nvcc -- no torch needed, nothing is
# run -- so machines without a GPU or a CUDA build of torch still catch CUDA compile errors.
# Each file is compiled for sm_90 (H100/H200) and sm_80 (A100). Prints a skip line and exits 0
# when nvcc is absent; exits non-zero if any compile fails.
#   NVCC=/path/to/nvcc bash scripts/check_cuda_compile.sh   # another nvcc
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}

if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda_compile: SKIP (no nvcc on PATH)"
    exit 0
fi
shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "check_cuda_compile: SKIP (no csrc/*.cu)"
    exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fishkern_nvcc.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$NVCC" --version | tail -n 1
common=(-std=c++17 -O3 -Icsrc -Xcompiler -Wall)
failed=0
for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    for arch in "-arch=sm_90" "-gencode=arch=compute_80,code=sm_80"; do
        if "$NVCC" "${common[@]}" "$arch" -c "$src" -o "$tmp/$name.o"; then
            echo "check_cuda_compile: ok   $src ($arch)"
        else
            echo "check_cuda_compile: FAIL $src ($arch)"
            failed=1
        fi
    done
done
exit $failed
