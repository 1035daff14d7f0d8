"""Test configuration.

Without a GPU, Triton kernels are tested with Triton's interpreter on CPU tensors. The interpreter
is chosen by TRITON_INTERPRET=1, which must be set before triton is first imported; fishkern never
imports triton at import time, so setting it here is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fishkern.ops.triton_support import triton_status, triton_supported  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = triton_supported()
if HAS_CUDA:
    # The tests compare fp32 CUDA results with fp32 / fp64 references at 1e-5 and tighter: no TF32
    # (cuDNN allows it for convolutions by default, e.g. the Conv2d Fisher's grouped form).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def triton_devices():
    """Devices the Triton path is tested on: CUDA when present, the CPU interpreter otherwise."""
    return ["cuda"] if HAS_CUDA else ["cpu"]


requires_triton = pytest.mark.skipif(not HAS_TRITON, reason=triton_status())


def pytest_collection_modifyitems(config, items):
    """Tests parametrised on a CUDA device carry the `cuda` marker (scripts/gpu_tests.py selects by it)."""
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs and any(v == "cuda" or getattr(v, "type", None) == "cuda" for v in cs.params.values()):
            item.add_marker(pytest.mark.cuda)
