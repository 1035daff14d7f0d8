#!/usr/bin/env bash
# GPU validation in one command, for a session that has a lent GPU machine (the `device` tool runs
# it in the repository root there). The GPU image has CUDA torch, triton, transformers, pytest and
# ninja but no network, so nothing is installed from the registry.
#   bash scripts/gpu_check.sh test    build the extension (CPU + CUDA) and run the whole test suite
#                                     on the GPU: Triton kernels natively, the CUDA top-k op
#   bash scripts/gpu_check.sh bench   the benchmarks at full size (BERT-large, ResNet-34)
#   bash scripts/gpu_check.sh all     both (default; may exceed one 10-minute device command)
# Logs and results are bundled into $OUT/gpu_<stage>.tgz (the device tool brings back at most
# 8 files); when OUT is unset they stay in out/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
work=out/gpu
mkdir -p "$work"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
rc=0

"$PY" - <<'PYEOF' 2>&1 | tee "$work/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PYEOF

if [ "$stage" = test ] || [ "$stage" = all ]; then
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$work/build.log" 2>&1; then
        echo "gpu_check: the native build failed (see $work/build.log)"; tail -40 "$work/build.log"; rc=1
    else
        grep -E "building the native extension" "$work/build.log"
        "$PY" -m pytest -q -rs tests 2>&1 | tee "$work/tests.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    fi
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
    "$PY" -c "import fishkern._native as n; assert n.native_available(), 'build first: bash scripts/gpu_check.sh test'" || exit 1
    "$PY" benchmarks/bench_topk.py --out "$work" 2>&1 | tee "$work/bench_topk.log" || rc=1
    "$PY" benchmarks/bench_masked_optim.py --out-dir "$work" 2>&1 | tee "$work/bench_masked_optim.log" || rc=1
fi
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_${stage}.tgz" -C "$work" .
    echo "gpu_check: results in \$OUT/gpu_${stage}.tgz"
fi
exit $rc
