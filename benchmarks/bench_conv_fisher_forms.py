"""Conv2d Fisher forms, layer by layer: where each exact form of fishkern::conv2d_fisher_acc_ wins.

For every distinct 3x3 / 1x1 conv layer of ResNet-34 for CIFAR (32x32 inputs) at batch B, times
(median of --reps, interleaved) the op's default-kernel forms side by side with:

* ``batch-wgrad``  the batch weight gradient of the layer (one conv weight-gradient call): what a
                   plain backward spends on the layer's weight, the floor of every Fisher form;
* ``old-unfold``   the rule fishkern had before (unfold, einsum per chunk, ``square().sum(0)``);
* ``grouped``      the op's grouped form (chunk folded into the groups of one weight-gradient conv);
* ``unfold``       the op's unfold form (im2col, one GEMM per sample into a reused buffer);
* ``fused``        the CPU kernel's fused form (im2col, then the Linear Fisher's native
                   register-tiled form over the output positions; unfold without the extension);
* ``auto``         what ``choose_form`` picks (grouped from ``GROUPED_MIN_POSITIONS``, fused up
                   to ``FUSED_MAX_POSITIONS``, unfold between).

Ratios are to ``batch-wgrad``. The report records the machine (CPU model, threads, load).

    python benchmarks/bench_conv_fisher_forms.py            # about 1-2 minutes on a 2-core CPU
    python benchmarks/bench_conv_fisher_forms.py --quick    # B=8, one rep
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fishkern
import _common as C  # noqa: E402

from fishkern.ops import conv_fisher as cf  # noqa: E402
from fishkern.ops import linear_fisher as lf  # noqa: E402

# (Cin, Cout, H, kernel, stride, padding): ResNet-34 CIFAR's distinct conv layers
LAYERS = (
    (3, 64, 32, 3, 1, 1),
    (64, 64, 32, 3, 1, 1),
    (64, 128, 32, 3, 2, 1),
    (128, 128, 16, 3, 1, 1),
    (64, 128, 32, 1, 2, 0),
    (128, 256, 16, 3, 2, 1),
    (256, 256, 8, 3, 1, 1),
    (256, 512, 8, 3, 2, 1),
    (512, 512, 4, 3, 1, 1),
    (256, 512, 8, 1, 2, 0),
)
METHODS = ("batch-wgrad", "old-unfold", "grouped", "unfold", "fused", "auto")


def old_unfold(acc, x, g, k, stride, padding, chunk_elems=cf.DEFAULT_CHUNK_ELEMS):
    """The Conv2d rule before issue 15 (groups=1): unfold + einsum per chunk, square + sum(0)."""
    B = x.shape[0]
    L = g.shape[2] * g.shape[3]
    cout, kk = acc.shape[0], acc[0].numel()
    w = acc.view(cout, kk)
    per_sample = (x.shape[1] * k * k + cout) * L + cout * kk
    step = max(1, chunk_elems // per_sample)
    for s in range(0, B, step):
        cols = F.unfold(x[s:s + step], k, 1, padding, stride)
        Gn = torch.einsum("bol,bil->boi", g[s:s + step].reshape(cols.shape[0], cout, L), cols)
        w.add_(Gn.square_().sum(0))


def run(args) -> dict:
    torch.manual_seed(0)
    rows = []
    for cin, cout, h, k, stride, padding in LAYERS:
        x = torch.randn(args.batch, cin, h, h)
        ho = cf.output_size(h, k, stride, padding, 1)
        g = torch.randn(args.batch, cout, ho, ho)
        acc = torch.zeros(cout, cin, k, k)
        weight = torch.empty(1).expand(cout, cin, k, k)
        calls = {
            "batch-wgrad": lambda: torch.ops.aten.convolution_backward(
                g, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [False, True, False]),
            "old-unfold": lambda: old_unfold(acc, x, g, k, stride, padding),
            "grouped": lambda: cf.conv2d_fisher_acc_(acc, x, g, stride, padding, form="grouped"),
            "unfold": lambda: cf.conv2d_fisher_acc_(acc, x, g, stride, padding, form="unfold"),
            "fused": lambda: cf.conv2d_fisher_acc_(acc, x, g, stride, padding, form="fused"),
            "auto": lambda: cf.conv2d_fisher_acc_(acc, x, g, stride, padding, form="auto"),
        }
        times = {m: [] for m in METHODS}
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for m in METHODS:
                times[m] += C.time_calls(calls[m], torch.device("cpu"), 0, 1)
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append({"layer": f"{cin}->{cout} {h}x{h} k{k} s{stride}", "positions": ho * ho,
                     "auto_form": cf.choose_form(ho * ho, fused=lf.fused_available()), "median_s": med})
        C.log(f"{rows[-1]['layer']}: " + ", ".join(f"{m} {1e3 * v:.1f} ms" for m, v in med.items()))
    return {"rows": rows}


def render(result: dict, env: dict, args, load_before, load_after) -> str:
    header = ["layer", "Ho·Wo", *[f"{m} ms" for m in METHODS], "grouped/wgrad", "unfold/wgrad", "fused/wgrad", "auto/wgrad",
              "old/auto", "auto picks"]
    rows = []
    for r in result["rows"]:
        m = r["median_s"]
        rows.append([r["layer"], str(r["positions"]), *[f"{1e3 * m[k]:.1f}" for k in METHODS],
                     f"{m['grouped'] / m['batch-wgrad']:.2f}", f"{m['unfold'] / m['batch-wgrad']:.2f}",
                     f"{m['fused'] / m['batch-wgrad']:.2f}", f"{m['auto'] / m['batch-wgrad']:.2f}", f"{m['old-unfold'] / m['auto']:.2f}", r["auto_form"]])
    tot = {k: sum(r["median_s"][k] for r in result["rows"]) for k in METHODS}
    return "\n".join([
        f"# Conv2d Fisher forms, batch {args.batch}, {datetime.date.today()}",
        "",
        f"Device: {env['device_description']}; torch {env['torch']}; load average {load_before} before, "
        f"{load_after} after.",
        f"Command: `{C.command_line()}`",
        f"Median of {args.reps} interleaved reps per layer. `auto` (the op's CPU kernel) uses grouped from "
        f"{cf.GROUPED_MIN_POSITIONS} output positions up, below it fused (native register-tiled form, "
        f"loaded: {lf.fused_available()}) up to {cf.FUSED_MAX_POSITIONS} positions, else unfold.",
        "",
        C.md_table(header, rows),
        "",
        "Sum over the distinct layers (each once): " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in tot.items())
        + f"; auto/batch-wgrad {tot['auto'] / tot['batch-wgrad']:.2f}, old/auto {tot['old-unfold'] / tot['auto']:.2f}.",
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 8, one rep (a smoke run)")
    p.add_argument("--out", default=os.path.join(C.BENCH_DIR, "results", "conv_fisher_forms_cpu"),
                   help="result path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.reps = 8, 1
    env = C.environment(torch.device("cpu"))
    before = os.getloadavg()[0]
    result = run(args)
    after = os.getloadavg()[0]
    text = render(result, env, args, f"{before:.2f}", f"{after:.2f}")
    print(text)
    C.write_text(args.out + ".md", text)
    C.write_json(args.out + ".json", {"env": env, "args": vars(args), "load_average": [before, after], **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
