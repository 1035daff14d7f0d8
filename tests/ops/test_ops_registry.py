"""The op layer as a whole: every fishkern op is declared once with a fake and a default kernel,
each is opcheck-ed by a test, and importing the package declares nothing that needs triton."""
import pathlib
import subprocess
import sys

import torch

from fishkern.ops import OP_MODULES, all_ops

TESTS = pathlib.Path(__file__).parent


def test_every_op_has_a_default_kernel():
    """A default (CompositeExplicitAutograd) kernel runs on any device, with or without the native
    extension; the fakes are exercised by each op's opcheck (test_faketensor)."""
    ops = all_ops()
    assert {"topk_select", "gather_masked", "scatter_masked_", "masked_adamw_step_", "masked_sgd_step_",
            "linear_fisher_acc_", "conv2d_fisher_acc_"} <= set(ops), sorted(ops)
    for name in ops:
        qual = f"fishkern::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CompositeExplicitAutograd"), f"{name}: no default kernel"


def test_every_op_is_opchecked_by_a_test():
    """Each op name appears in a tests/ops/test_ops_*.py file that calls torch.library.opcheck."""
    sources = {p.name: p.read_text() for p in TESTS.glob("test_ops_*.py")}
    for name in all_ops():
        files = [f for f, text in sources.items() if "opcheck" in text and name in text]
        assert files, f"no tests/ops/test_ops_*.py opchecks fishkern::{name}"


def test_op_modules_import_without_triton_or_cuda():
    code = (
        "import sys, torch\n"
        "from fishkern.ops import all_ops\n"
        "all_ops()\n"
        "assert 'triton' not in sys.modules, 'declaring the ops imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'declaring the ops initialised CUDA'\n"
        "print(len(all_ops()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(all_ops())
    assert len(OP_MODULES) == 7
