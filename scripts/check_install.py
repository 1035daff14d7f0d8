"""Smoke check of one fishkern installation, run inside the environment under test (scripts/ci_installs.sh).

Prints `fishkern env`, then ends with real work: a global top-k (checked against the plain-PyTorch
reference) and two MaskedAdamW steps (checked against torch.optim.AdamW on the trained entries).
Fails unless the native extension is there (or FISHKERN_NO_NATIVE is set) and came the expected way.

    python scripts/check_install.py [--expect "built at install" | "first-use build" | "first-use build (cached)"]
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect", default=None, help="how the native extension must have been obtained")
    ap.add_argument("--cuda-kernels", action="store_true", help="the library must hold the CUDA top-k kernel")
    ap.add_argument("--not-from", default=None, help="a directory the package must not be imported from")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch

    import fishkern
    from fishkern import env
    from fishkern._native import native_info

    where = os.path.dirname(os.path.abspath(fishkern.__file__))
    if args.not_from and where.startswith(os.path.abspath(args.not_from)):
        sys.exit(f"check_install: fishkern was imported from {where}, inside the source tree; expected an installed copy")
    print(env.render(env.collect()), flush=True)

    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(1000, 30, generator=g), torch.randint(0, 4, (777,), generator=g).float(), torch.randn(5, generator=g)]
    k = 1500
    got = fishkern.global_topk(scores, k)
    want = fishkern.topk.global_topk_reference(scores, k)
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        sys.exit("check_install: global_topk disagrees with the reference")
    info = native_info()
    print(f"native extension: {info.how} {info.path or info.reason}", flush=True)
    if os.environ.get("FISHKERN_NO_NATIVE", "0") in ("", "0"):
        if not info.available:
            sys.exit(f"check_install: no native extension: {info.reason}")
        if args.expect and info.how != args.expect:
            sys.exit(f"check_install: the native extension was obtained by {info.how!r}, expected {args.expect!r}")

    if args.cuda_kernels and not torch._C._dispatch_has_kernel_for_dispatch_key("fishkern::topk_select", "CUDA"):
        sys.exit("check_install: the CUDA kernels were not built")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    ref.load_state_dict(model.state_dict())
    mask = fishkern.FishMask.random(model.named_parameters(), 0.25, seed=1, force=())
    # no weight decay: dense AdamW would decay the untrained entries too, and the models would part ways
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.0)
    dense = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    indices = [i.long() for i in mask.mask_indices(model)]
    for _ in range(3):
        for m, o in ((model, opt), (ref, dense)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        for q, idx in zip(ref.parameters(), indices):
            keep = torch.zeros(q.numel(), dtype=torch.bool)
            keep[idx] = True
            q.grad.view(-1)[~keep] = 0  # the original FISH recipe: dense AdamW on a masked gradient
        opt.step()
        dense.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if not torch.allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6):
            sys.exit(f"check_install: MaskedAdamW disagrees with masked dense AdamW on {name}")
    print(f"check_install: ok (global_topk exact, MaskedAdamW == masked AdamW) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
