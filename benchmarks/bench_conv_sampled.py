"""Would a sampled (SDDMM) weight gradient pay for Conv2d? ResNet-34 (CIFAR) layer shapes, batch 32:
torch's weight-gradient convolution (``aten.convolution_backward``, weight only) then a gather of
the k masked entries, against the sampled form — im2col (``F.unfold``) of the input and the
output gradient laid out as [N·P, C·KH·KW] and [N·P, OUT], then ``fishkern::sampled_matmul`` — at
0.02%, 0.5% and 2.5% of the weight. Both give the same k values (checked here, float32).

    python benchmarks/bench_conv_sampled.py      # CPU: about a minute

Results: benchmarks/results/conv_sampled_{device}.{md,json}. The decision it supports: sparse
backward leaves Conv2d dense (see fishkern/optim/sparse_backward.py).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (name, in channels, out channels, spatial size, stride) of ResNet-34's 3x3 convolutions on CIFAR
LAYERS = (("stage1 3x3", 64, 64, 32, 1), ("stage2 3x3", 128, 128, 16, 1), ("stage3 3x3", 256, 256, 8, 1),
          ("stage4 3x3", 512, 512, 4, 1))
DENSITIES = (0.0002, 0.005, 0.025)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    from fishkern.ops.sampled_matmul import sampled_matmul

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, cin, cout, hw, stride in LAYERS:
        x = torch.randn(args.batch, cin, hw, hw, generator=g).to(device)
        w = torch.randn(cout, cin, 3, 3, generator=g).to(device)
        go = torch.randn(args.batch, cout, hw // stride, hw // stride, generator=g).to(device)

        def dense_w(idx):
            gw = torch.ops.aten.convolution_backward(go, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
                                                     [False, True, False])[1]
            return gw.reshape(-1).index_select(0, idx)

        def sampled_w(idx):
            cols = F.unfold(x, 3, padding=1, stride=stride)  # [N, C*9, P]
            b = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            a = go.flatten(2).transpose(1, 2).reshape(-1, cout)
            return sampled_matmul(a, b, idx)

        for d in DENSITIES:
            k = max(1, int(d * w.numel()))
            idx = torch.randperm(w.numel(), generator=g)[:k].sort().values.to(device)
            torch.testing.assert_close(sampled_w(idx), dense_w(idx), rtol=1e-4, atol=1e-3)
            t_d = statistics.median(C.time_calls(lambda: dense_w(idx), device, 1, args.reps))
            t_s = statistics.median(C.time_calls(lambda: sampled_w(idx), device, 1, args.reps))
            rows.append({"layer": name, "shape": f"{cout}x{cin}x3x3 at {hw}x{hw}", "density": d, "k": k,
                         "dense_gather_ms": 1e3 * t_d, "sampled_ms": 1e3 * t_s, "sampled_speedup": t_d / t_s})
            C.log(f"{name} {100 * d:g}%: dense+gather {1e3 * t_d:.2f} ms, sampled {1e3 * t_s:.2f} ms")
    env = C.environment(device)
    text = "\n".join([
        f"# Conv2d weight gradient: dense then gather against sampled (im2col + SDDMM), {device}", "",
        f"Command: `{C.command_line(argv)}`  ", f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"git {C.git_revision()}  ", f"Device: {env['device_description']}; torch {env['torch']}", "",
        f"ResNet-34 (CIFAR) 3x3 layers, batch {args.batch}, median of {args.reps} calls; both forms give the same k values.", "",
        C.md_table(["layer", "weight", "density", "k", "dense + gather (ms)", "sampled (ms)", "sampled speedup"],
                   [[r["layer"], r["shape"], f"{100 * r['density']:g}%", str(r["k"]), f"{r['dense_gather_ms']:.2f}",
                     f"{r['sampled_ms']:.2f}", f"{r['sampled_speedup']:.2f}x"] for r in rows]), ""])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    C.write_text(RESULTS / f"conv_sampled_{device.type}.md", text)
    C.write_json(RESULTS / f"conv_sampled_{device.type}.json", {"environment": env, "rows": rows, "command": C.command_line(argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
