#!/usr/bin/env bash
# Set up and run fishkern's test suite on a fresh machine, from the repository root or anywhere.
#   1. torch: the pinned CPU build 2.13.0 if no torch is installed (an unpinned resolve would pull
#      the CUDA build and several GB of CUDA packages); an existing torch is kept.
#   2. fishkern itself, editable, with its test extras (pytest, triton where it installs); this
#      compiles the native extension (csrc/, C++; CUDA too when torch has CUDA) with ninja.
#   3. pytest. Triton kernels run under TRITON_INTERPRET=1 when there is no GPU (tests/conftest.py).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k adamw`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "installing torch 2.13.0 (no torch was installed)" >&2
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja
echo "installing fishkern and its test extra; this compiles the native extension (csrc/) against torch $("$PY" -c 'import torch; print(torch.__version__)'): about a minute, longer with CUDA" >&2
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" - <<'PYEOF'
import os, sys
import torch, fishkern
from fishkern._native import native_available
print(f"fishkern {fishkern.__version__}, torch {torch.__version__}, cuda: {torch.cuda.is_available()}, "
      f"native extension: {native_available()}")
# a failed native build must not turn into silently skipped tests
if not native_available() and os.environ.get("FISHKERN_NO_NATIVE", "0") in ("", "0"):
    sys.exit("the native extension did not build or load; see the pip output above")
PYEOF
exec "$PY" -m pytest -q tests "$@"
