"""A tiny workload for `compute-sanitizer --tool memcheck`: stage 04 of scripts/gpu_check.sh.

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/gpu_sanitize.py --device cuda
    python scripts/gpu_sanitize.py --device cpu      the same calls on CPU (the dry run)

One call of each kernel family fishkern launches on CUDA, on odd sizes so that tails and partial
blocks are exercised: the native CUDA global top-k (backend "native"), one MaskedAdamW and one
MaskedSGD step with implementation "triton" (several parameters, an empty mask, a full one), and
the Triton Fisher kernel through estimate_fisher(implementation="triton") on a model with a Linear
over a sequence. Each result is checked against a plain-PyTorch computation, so the script also
fails without the sanitizer when a kernel computes garbage. Inputs are tiny: memcheck slows every
kernel down by orders of magnitude.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fishkern  # noqa: E402
from fishkern.topk import global_topk_reference  # noqa: E402


class SeqModel(nn.Module):
    """Embedding -> Linear over the sequence (the Triton Fisher kernel's case) -> mean -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(37, 19)
        self.lin = nn.Linear(19, 23)
        self.head = nn.Linear(23, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin(self.emb(x))).mean(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)

    # 1. global top-k: three tensors of odd sizes, a few ties
    scores = [torch.randn(n, generator=g).round(decimals=1).to(dev) for n in (1, 1237, 4099)]
    k = 611
    got = fishkern.global_topk(scores, k, backend="native" if cuda else "auto")
    want = global_topk_reference(scores, k)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), "global_topk disagrees with the reference"
    print(f"global_topk ({'native' if cuda else 'auto'}): ok, k={k}", flush=True)

    # 2. one step of each masked optimizer on several parameters: odd sizes, an empty mask, a full one
    impl = "triton" if cuda else "auto"
    shapes = [(33, 17), (5,), (129,), (3, 7)]
    for name, cls, kw in (("MaskedAdamW", fishkern.MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)),
                          ("MaskedSGD", fishkern.MaskedSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))):
        params = [torch.randn(s, generator=g).to(dev).requires_grad_() for s in shapes]
        masks = [torch.randperm(params[0].numel(), generator=g)[:101].sort().values, torch.empty(0, dtype=torch.int64),
                 torch.arange(129), torch.tensor([0, 20])]
        masks = [m.to(dev) for m in masks]
        ref_params = [p.detach().clone().requires_grad_() for p in params]
        opt = cls(params, masks, implementation=impl, **kw)
        ref = cls(ref_params, masks, implementation="torch", **kw)
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g).to(dev)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        err = max((p - q).abs().max().item() for p, q in zip(params, ref_params))
        assert err <= 1e-5, f"{name} ({impl}) differs from the PyTorch path by {err:.2e}"
        print(f"{name} ({impl}) one step: ok, max |diff| vs torch {err:.1e}", flush=True)

    # 3. the Fisher kernel: a Linear over a sequence
    torch.manual_seed(0)
    model = SeqModel().to(dev)
    data = [(torch.randint(0, 37, (3, 11), generator=g).to(dev), torch.randint(0, 3, (3,), generator=g).to(dev)) for _ in range(2)]
    res = fishkern.estimate_fisher(model, data, 6, implementation="triton" if cuda else "auto", progress=False, self_check=False)
    ref = fishkern.estimate_fisher(model, data, 6, implementation="loop", progress=False)
    err = max(((res.scores[n] - ref.scores[n]).abs().max() / ref.scores[n].abs().max().clamp_min(1e-30)).item() for n in ref.scores)
    assert not cuda or res.implementation == "triton", f"estimate_fisher ran {res.implementation}, not triton"
    assert err <= 1e-4, f"Fisher ({res.implementation}) differs from the per-sample loop by {err:.2e} (relative)"
    print(f"estimate_fisher ({res.implementation}): ok, max relative diff vs loop {err:.1e}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    print("gpu_sanitize: workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
