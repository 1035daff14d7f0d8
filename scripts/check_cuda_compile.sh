#!/usr/bin/env bash
# Compile-check fishkern's CUDA kernels (csrc/*.cu) with plain nvcc -- no torch needed, nothing is
# run -- so machines without a GPU or a CUDA build of torch still catch CUDA compile errors.
# Each file is compiled for sm_90 (H100/H200) and sm_80 (A100) with `-Xptxas -v`; one line per
# kernel gives its registers and spill bytes. Prints a skip line and exits 0 when nvcc is absent;
# exits non-zero if any compile fails or any kernel spills registers to local memory.
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
demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }
common=(-std=c++17 -O3 -Icsrc -Xcompiler -Wall -Xptxas -v)
failed=0
for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    for arch in "-arch=sm_90" "-gencode=arch=compute_80,code=sm_80"; do
        log="$tmp/$name.log"
        if "$NVCC" "${common[@]}" "$arch" -c "$src" -o "$tmp/$name.o" >"$log" 2>&1; then
            echo "check_cuda_compile: ok   $src ($arch)"
        else
            echo "check_cuda_compile: FAIL $src ($arch)"
            failed=1
        fi
        # ptxas -v: "Compiling entry function 'X' for 'sm_NN'" / "Function properties for X", then
        # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers".
        # Everything else (compiler warnings and errors) is shown as it is.
        demangle <"$log" | awk '
            /^ptxas info *: Compiling entry function/ { next }
            /^ptxas info *: Function properties for / {
                fn = $0; sub(/.*Function properties for /, "", fn)
                gsub(/\(anonymous namespace\)::|fishkern_topk::/, "", fn)
                sub(/^void /, "", fn); sub(/\(.*$/, "", fn)  # the argument list
                if (length(fn) > 40 && index(fn, "<")) fn = substr(fn, 1, index(fn, "<")) "...>"
                next }
            /bytes spill stores/ { st = $5; ld = $9; next }
            /^ptxas info *: Used [0-9]+ registers/ {
                regs = $5
                flag = (st + ld > 0) ? "SPILL" : "     "
                printf "check_cuda_compile: %s %-44s regs %3d  spills %d/%d B\n", flag, fn, regs, st, ld
                if (st + ld > 0) spilled = 1
                st = 0; ld = 0; next }
            /^ptxas info/ { next }
            { print }
            END { exit spilled ? 3 : 0 }'
        status=("${PIPESTATUS[@]}")
        if [ "${status[1]}" -eq 3 ]; then
            echo "check_cuda_compile: FAIL $src ($arch): a kernel spills registers (see SPILL lines)"
            failed=1
        fi
    done
done
exit $failed
