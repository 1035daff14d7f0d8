#!/usr/bin/env bash
# GPU validation in ONE device command of at most 8 minutes (the `device` tool runs it in the
# repository root of a bare GPU machine: CUDA torch, triton, pytest, ninja, no network).
#
#   bash scripts/gpu_check.sh              all stages, on the GPU
#   bash scripts/gpu_check.sh --dry-run    (or GPU_CHECK_DRY_RUN=1) the CPU half: what every stage can
#                                          do without a GPU, plus the script's plumbing; CI runs it
#   bash scripts/gpu_check.sh --list       the stages and their budgets, one "nn name seconds" a line
#   bash scripts/gpu_check.sh --stage NAME one stage alone (no timeout, no summary), e.g. to debug it
#
# Stages, in the order of what they are worth when the time runs out; each runs under its own
# `timeout` (budgets below, summing to <= 480 s), later stages run whatever an earlier one did:
#   01 setup     versions, the GPU and its clocks, nvcc and compute-sanitizer; then the native
#                extension built in place (MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST=9.0)
#   02 tests     only the tests that touch CUDA or Triton (scripts/gpu_tests.py selects them); the
#                summary line names the failed tests
#   03 smoke     the whole data path on the GPU against the CPU (scripts/gpu_smoke.py)
#   04 sanitize  compute-sanitizer memcheck of the CUDA top-k, Triton optimizer and Fisher kernels
#   05 bench     full-size masked AdamW step: CUDA-event and host time, syncs, GB/s vs the peak
#   06 fisher    the Fisher pass against its peers (benchmarks/bench_fisher.py: batch-1 loop, vmap,
#                plain forward+backward) on BERT-large (T=128) and ResNet-34, N=256, one workload at
#                a time under its own limit
#
# Output, written while it runs, so a killed command still returns what was done: $OUT/<nn>_<stage>.log
# (tee'd), one line per stage appended to $OUT/summary.txt as soon as the stage ends
# ("<nn>_<stage> rc=<rc> <seconds>s budget=<s>s limit=<s>s <status> (note)"), and $OUT/bench.json
# (the step benchmark's report under "gpu_step", each Fisher workload's under "fisher:<name>", added
# as each ends). That is 8 files, the most the device tool brings back: copy them into the
# repository (benchmarks/results/) before the session ends, the device tool's copy does not last.
# OUT defaults to a new temporary directory when unset.
# Exit status: 0 when every stage passed, 1 otherwise (a failing stage does not stop the next).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# the scripts import the checkout's fishkern (on the GPU machine it is not installed)
case ":${PYTHONPATH:-}:" in *":$ROOT:"*) ;; *) export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;; esac

# name budget_s; the order is the run order. Sum <= TOTAL_BUDGET (checked before anything runs).
# Budgets: the H200 run of 2026-12-04 took 10 s (env) + 33 s (build), 61 s (tests), 50 s for smoke,
# sanitize and bench together, and BERT-large's Fisher benchmark 195 s at N=1024 (N=256 here).
STAGES=(
    "setup 85"
    "tests 110"
    "smoke 30"
    "sanitize 40"
    "bench 35"
    "fisher 180"
)
TOTAL_BUDGET=480
if [ "${GPU_CHECK_SELFTEST:-0}" = 1 ]; then
    # tests/project/test_gpu_script.py: the driver's handling of a pass, a failure and a timeout
    STAGES=("pass 20" "fail 20" "hang 1")
    stage_pass() { echo "a passing stage"; }
    stage_fail() { echo "a failing stage"; echo "it failed" >"$NOTE"; return 3; }
    stage_hang() { echo "a hanging stage"; sleep 60; }
fi
MAX_OUT_FILES=8  # what the device tool brings back
DRY_SCALE=${GPU_CHECK_DRY_SCALE:-2}

case ${GPU_CHECK_DRY_RUN:-0} in 0|"") DRY=0 ;; *) DRY=1 ;; esac
mode=all
only=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --list) mode=list ;;
        --stage) mode=stage; only=${2:?--stage needs a stage name}; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
export GPU_CHECK_DRY_RUN=$DRY

# scratch (not brought back): the test list, the benchmark's markdown, the smoke's diff files
WORK=${GPU_CHECK_WORK:-$ROOT/out/gpu}
mkdir -p "$WORK"

budget_sum() {
    local s=0 e
    for e in "${STAGES[@]}"; do s=$(( s + ${e##* } )); done
    echo $s
}

# ------------------------------------------------------------------------------------------ stages
# Each stage_<name> runs with the log as stdout/stderr. A stage may write one short note (shown in
# the summary line) to $NOTE.

stage_setup() {
    stage_env && stage_build
}

stage_env() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -srm)  nproc: $(nproc)  dry run: $DRY"
    echo "repo: $ROOT  $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
    df -h "$ROOT" 2>/dev/null | tail -1
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,clocks.sm,clocks.mem,power.limit,temperature.gpu --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
    if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version | tail -1; else echo "compute-sanitizer: not found"; fi
    "$PY" - <<'PYEOF'
import os, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for mod in ("triton", "transformers", "numpy", "safetensors", "pytest", "pynvml", "xdist", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "(no __version__)"))
    except Exception as e:  # absent is information, not an error
        print(mod, "absent:", type(e).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.1f} GiB")
    for attr in ("memory_clock_rate", "memory_bus_width", "L2_cache_size"):
        print(f"  props.{attr}:", getattr(p, attr, "(not exposed by this torch)"))
elif os.environ.get("GPU_CHECK_DRY_RUN") == "1":
    print("no CUDA device (dry run)")
else:
    sys.exit("no CUDA device visible to torch")
PYEOF
}

stage_build() {
    if [ "$DRY" = 1 ]; then
        # the CPU part: setup.py's build plan (evaluating setup.py plans, --version compiles nothing)
        echo "dry run: would run MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py build_ext --inplace"
        "$PY" setup.py --version || return 1
        "$PY" -c "from fishkern._native import native_info; print('native now:', native_info().as_dict())"
        return
    fi
    rm -rf build/temp.* 2>/dev/null
    MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace || return 1
    # the library must load, and the CUDA top-k must run on the GPU
    "$PY" - <<'PYEOF'
import torch
from fishkern import global_topk
from fishkern._native import native_info
info = native_info()
print("native:", info.as_dict())
assert info.available, "the in-place build does not load"
x = torch.randn(1000, device="cuda")
idx = global_topk([x], 10, backend="native")[0]
assert torch.equal(idx.sort().values.cpu(), torch.topk(x, 10).indices.sort().values.cpu()), "CUDA top-k disagrees with torch.topk"
print("CUDA global_topk: ok")
PYEOF
}

stage_tests() {
    if [ "$DRY" = 1 ]; then
        "$PY" scripts/gpu_tests.py --list --out "$WORK/gpu_tests.txt"
    else
        # no just-in-time native build inside the tests: stage 01 built it, or its failure shows
        local rc
        FISHKERN_NO_JIT=1 "$PY" scripts/gpu_tests.py --out "$WORK/gpu_tests.txt" 2>&1 | tee "$WORK/gpu_tests.log"
        rc=${PIPESTATUS[0]}
        # the failed tests in the summary line: it survives when nothing else of the run does
        grep -E '^(FAILED|ERROR) ' "$WORK/gpu_tests.log" | sed -E 's/^(FAILED|ERROR) tests\///; s/ - .*//' \
            | head -12 | tr '\n' ' ' >"$NOTE"
        return "$rc"
    fi
}

stage_smoke() {
    if [ "$DRY" = 1 ]; then
        "$PY" scripts/gpu_smoke.py --device cpu --work "$WORK/smoke"
    else
        FISHKERN_NO_JIT=1 "$PY" scripts/gpu_smoke.py --device cuda --work "$WORK/smoke"
    fi
}

stage_sanitize() {
    local dev=cuda
    [ "$DRY" = 1 ] && dev=cpu
    if ! command -v compute-sanitizer >/dev/null; then
        echo "SKIP: compute-sanitizer not found; running the workload without it"
        echo "skipped: no compute-sanitizer" >"$NOTE"
        FISHKERN_NO_JIT=1 "$PY" scripts/gpu_sanitize.py --device $dev
        return
    fi
    if [ "$DRY" = 1 ]; then
        echo "dry run: compute-sanitizer is here but there is no GPU; running the workload alone"
        "$PY" scripts/gpu_sanitize.py --device cpu
        return
    fi
    # Triton compiles its kernels in this process: the JIT and the driver's PTX load are slow under
    # the tool, so compile first without it (the compiled kernels are cached on disk), then check.
    FISHKERN_NO_JIT=1 "$PY" scripts/gpu_sanitize.py --device cuda || return 1
    local log=$WORK/sanitizer.txt rc
    # no caching allocator: each tensor its own cudaMalloc, so a read past a tensor's end is caught
    # (inside one of the allocator's big blocks memcheck sees nothing wrong)
    FISHKERN_NO_JIT=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        "$PY" scripts/gpu_sanitize.py --device cuda 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] && grep -q "Device not supported" "$log" && ! grep -q "Invalid __global__" "$log"; then
        # gVisor machines: the tool cannot attach to the device at all (KINDS.md); not a finding
        echo "SKIP: compute-sanitizer refused the device (runtime without sanitizer support)"
        echo "skipped: sanitizer refused the device" >"$NOTE"
        return 0
    fi
    grep -E "ERROR SUMMARY" "$log" | tail -1 >"$NOTE"
    return "$rc"
}

stage_bench() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_gpu_step.py --device cpu --tiny --out "$WORK/bench" || return 1
    else
        FISHKERN_NO_JIT=1 "$PY" benchmarks/bench_gpu_step.py --device cuda --out "$WORK/bench" || return 1
    fi
    merge_report gpu_step "$WORK/bench/bench_gpu_step.json"
}

# $OUT/bench.json[key] = the JSON file $2 (the file is created on the first call)
merge_report() {
    "$PY" - "$OUT/bench.json" "$1" "$2" <<'PYEOF'
import json, os, sys
path, key, src = sys.argv[1:]
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
merged = json.load(open(path)) if os.path.exists(path) else {}
merged[key] = json.load(open(src))
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(merged, f, indent=1)
os.replace(tmp, path)
PYEOF
}

stage_fisher() {
    local dev=cuda n=256 w rc=0 extra=()
    # the dry run: the same two workloads at their --quick size on the CPU, three methods
    [ "$DRY" = 1 ] && { dev=cpu; n=8; extra=(--quick --methods fishkern loop floor); }
    for w in bert-large resnet34; do
        rm -rf "$WORK/fisher_$w"
        # one workload's limit: a slow one cannot take the other's time
        if FISHKERN_NO_JIT=1 timeout --kill-after=5 85 "$PY" benchmarks/bench_fisher.py --device $dev --workloads $w \
                --n $n --reps 2 --slow-reps 1 --loop-samples 32 --vmap-samples 64 --no-profile \
                --quiet-wait 0 --retries 0 "${extra[@]}" --out-dir "$WORK/fisher_$w"; then
            merge_report "fisher:$w" "$(ls "$WORK/fisher_$w"/fisher_*.json | head -1)" || rc=1
        else
            rc=1
            echo "$w: failed or over its limit; " >>"$NOTE"
        fi
    done
    return $rc
}

# ------------------------------------------------------------------------------------------ driver

if [ "$mode" = list ]; then
    i=0
    for e in "${STAGES[@]}"; do i=$((i + 1)); printf '%02d %s %s\n' $i ${e% *} ${e##* }; done
    echo "total $(budget_sum) of $TOTAL_BUDGET"
    exit 0
fi
if [ "$mode" = stage ]; then
    OUT=${OUT:-$WORK}; NOTE=${NOTE:-/dev/null}
    declare -F "stage_$only" >/dev/null || { echo "gpu_check: no stage $only" >&2; exit 2; }
    "stage_$only"
    exit $?
fi

total=$(budget_sum)
if [ "$total" -gt "$TOTAL_BUDGET" ]; then
    echo "gpu_check: the stage budgets sum to $total s, over the $TOTAL_BUDGET s a device command may take" >&2
    exit 2
fi
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
fi
mkdir -p "$OUT"
export OUT
: >"$OUT/summary.txt"
echo "gpu_check: dry run=$DRY, logs in $OUT, stage budgets sum to $total s"
failed=0
t_all=$(date +%s)
i=0
for e in "${STAGES[@]}"; do
    i=$((i + 1))
    name=${e% *}
    budget=${e##* }
    tag=$(printf '%02d_%s' $i "$name")
    log=$OUT/$tag.log
    NOTE=$WORK/$tag.note
    rm -f "$NOTE"
    # the dry run's CPU work is slower than the GPU's: its limits are the budgets x DRY_SCALE
    limit=$budget
    [ "$DRY" = 1 ] && limit=$(( budget * DRY_SCALE ))
    echo "=== $tag (budget $budget s, limit $limit s)"
    t0=$(date +%s)
    # the stage re-enters this script under its own timeout (which signals the whole process group)
    timeout --kill-after=10 "$limit" env NOTE="$NOTE" OUT="$OUT" bash "$0" --stage "$name" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    dt=$(( $(date +%s) - t0 ))
    status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    [ "$rc" -eq 0 ] || failed=1
    note=""
    [ -s "$NOTE" ] && note=" ($(head -c 600 "$NOTE" | tr '\n' ' ' | sed 's/ *$//'))"
    echo "$tag rc=$rc ${dt}s budget=${budget}s limit=${limit}s $status$note" >>"$OUT/summary.txt"
    echo "=== $tag: $status in $dt s$note"
done

# plumbing: what the device tool can bring back, and that every stage left its log and line
plumb=ok
n_lines=$(wc -l <"$OUT/summary.txt")
[ "$n_lines" -eq "${#STAGES[@]}" ] || plumb="summary has $n_lines lines for ${#STAGES[@]} stages"
n_files=$(( $(find "$OUT" -type f | wc -l) ))
[ "$n_files" -le "$MAX_OUT_FILES" ] || plumb="$n_files files under \$OUT, over the $MAX_OUT_FILES the device tool returns"
if find "$OUT" -mindepth 1 -name '*[^A-Za-z0-9._-]*' | grep -q .; then plumb="a name under \$OUT the device tool would not return"; fi
i=0
for e in "${STAGES[@]}"; do
    i=$((i + 1)); f=$OUT/$(printf '%02d_%s' $i "${e% *}").log
    [ -f "$f" ] || plumb="missing $f"
done
[ "$plumb" = ok ] || failed=1
echo "plumbing rc=$([ "$plumb" = ok ] && echo 0 || echo 1) budgets=${total}s/${TOTAL_BUDGET}s files=$n_files/$MAX_OUT_FILES $plumb" >>"$OUT/summary.txt"
echo "total rc=$failed $(( $(date +%s) - t_all ))s" >>"$OUT/summary.txt"
echo "=== gpu_check: $([ $failed = 0 ] && echo 'all stages passed' || echo 'FAILED'); summary:"
cat "$OUT/summary.txt"
exit $failed
