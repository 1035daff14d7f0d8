#!/usr/bin/env bash
# Set up and run fishkern's test suite on a fresh machine, from the repository root or anywhere.
#   1. torch: the pinned CPU build 2.13.0 if no torch is installed (an unpinned resolve would pull
#      the CUDA build and several GB of CUDA packages); an existing torch is kept.
#   2. fishkern itself, editable, with its test extras (pytest, triton where it installs).
#   3. pytest. Triton kernels run under TRITON_INTERPRET=1 when there is no GPU (tests/conftest.py).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k adamw`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" -c "import torch, fishkern; print(f'fishkern {fishkern.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
exec "$PY" -m pytest -q tests "$@"
