"""The timed methods. Each takes a workload and a sample count and returns (scores, info):
scores {parameter name: fp32 tensor} (None for the floor), info a small dict for the report.
Also: which samples each method is measured and warmed up on, and the check of scores against
fishkern's."""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from _common import synchronize
from fishkern.fisher import estimate_fisher

from .workloads import Workload, inputs_labels, iter_samples, logits

METHODS = ("fishkern", "fishkern-nocheck", "loop", "vmap", "floor")
DEFAULT_METHODS = METHODS
SLOW_METHODS = ("loop", "vmap")  # timed --slow-reps times, maybe on a subset
CHECKED_METHODS = ("vmap", "loop")  # their scores are compared with fishkern's
LOOP_WARM_SAMPLES = 4
# the ratios a report gives: (numerator method, denominator method, name)
RATIOS = (("loop", "fishkern", "loop/fishkern"), ("vmap", "fishkern", "vmap/fishkern"), ("fishkern", "floor", "fishkern/floor"),
          ("loop", "fishkern-nocheck", "loop/fishkern-nocheck"), ("fishkern", "fishkern-nocheck", "fishkern/fishkern-nocheck"))


def has_self_check() -> bool:
    return "self_check" in inspect.signature(estimate_fisher).parameters


def run_fishkern(wl: Workload, n: int, impl: str, self_check: bool | None = None):
    kw = {} if self_check is None else {"self_check": self_check}
    res = estimate_fisher(wl.model, wl.batches, n, implementation=impl, progress=False, **kw)
    return res.scores, {"implementation": res.implementation, "fallback_reason": res.fallback_reason,
                        "generic_modules": res.generic_modules}


def run_loop(wl: Workload, n: int):
    res = estimate_fisher(wl.model, wl.batches, n, implementation="loop", progress=False)
    return res.scores, {"implementation": res.implementation}


def run_floor(wl: Workload, n: int):
    """A plain batched forward + backward over the samples: the lower bound of any Fisher method."""
    model = wl.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for b in iter_samples(wl.batches, n):
            model.zero_grad()  # set_to_none=True (torch's default)
            inputs, labels = inputs_labels(wl, b)
            out = model(**inputs) if wl.hf else model(inputs)
            F.cross_entropy(logits(out), labels).backward()
        synchronize(next(model.parameters()).device)
    finally:
        model.zero_grad()
        for p, r in flags:
            p.requires_grad_(r)
    return None, {}


def _set_attn(model, impl: str | None) -> str | None:
    """Switch a transformers model's attention implementation; returns the previous one (None: not HF)."""
    cfg = getattr(model, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if prev is None or impl is None or impl == prev:
        return prev
    model.set_attn_implementation(impl)
    return prev


def run_vmap(wl: Workload, n: int, chunk: int, attn: str):
    """Per-sample gradients by torch.func (functional_call + vmap(grad)), squared and summed."""
    from torch.func import functional_call, grad, vmap

    model = wl.model
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    acc = {k: torch.zeros(v.shape, dtype=torch.float32, device=v.device) for k, v in params.items()}
    prev = _set_attn(model, attn) if wl.hf else None
    used_attn = getattr(model.config, "_attn_implementation", None) if wl.hf else None
    dtype = next(iter(params.values())).dtype

    def loss_one(prm, inputs, y):
        if wl.hf:
            kw = {k: v.unsqueeze(0) for k, v in inputs.items()}
            if "attention_mask" in kw:  # a ready 4-D mask: transformers returns it as is (no .all() under vmap)
                keep = kw["attention_mask"].bool()[:, None, None, :]
                T = keep.shape[-1]
                if used_attn == "eager":  # additive
                    m4 = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
                else:  # sdpa: boolean, True = attend
                    m4 = keep
                kw["attention_mask"] = m4.expand(1, 1, T, T)
            out = functional_call(model, prm, (), kw)
        else:
            out = functional_call(model, prm, (inputs.unsqueeze(0),))
        return F.cross_entropy(logits(out).float(), y.unsqueeze(0), reduction="sum")  # -log p(y|x)

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    try:
        for b in iter_samples(wl.batches, n):
            inputs, labels = inputs_labels(wl, b)
            B = labels.shape[0]
            for s in range(0, B, chunk):
                e = min(B, s + chunk)
                sub = {k: v[s:e] for k, v in inputs.items()} if wl.hf else inputs[s:e]
                grads = per_sample(params, sub, labels[s:e])
                for k, gk in grads.items():
                    acc[k].add_(gk.square_().sum(0))
                del grads
        synchronize(next(iter(params.values())).device)
    finally:
        if wl.hf and prev is not None:
            _set_attn(model, prev)
    return acc, {"chunk": chunk, "attention": used_attn}


def is_oom(e: BaseException) -> bool:
    s = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in s or "can't allocate memory" in s


def method_call(method: str, wl: Workload, n: int, args, chunk: int | None = None):
    """``args`` needs fishkern_impl and vmap_attn."""
    if method == "fishkern":
        return run_fishkern(wl, n, args.fishkern_impl)
    if method == "fishkern-nocheck":
        return run_fishkern(wl, n, args.fishkern_impl, self_check=False)
    if method == "loop":
        return run_loop(wl, n)
    if method == "vmap":
        return run_vmap(wl, n, chunk or wl.vmap_chunk, args.vmap_attn)
    if method == "floor":
        return run_floor(wl, n)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def measured_n(method: str, wl: Workload) -> int:
    return wl.loop_n if method == "loop" else wl.vmap_n if method == "vmap" else wl.n


def warm_n(method: str, wl: Workload, chunk: int) -> int:
    return min(measured_n(method, wl), LOOP_WARM_SAMPLES if method == "loop" else chunk if method == "vmap" else wl.batch_size)


def rel_error(test: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """max over parameters p of max|test_p - ref_p| / max(max ref_p, 1e-8 x global max of ref)."""
    gmax = max(float(v.abs().max()) for v in ref.values())
    floor = 1e-8 * gmax
    worst, worst_name, per = 0.0, None, {}
    for k, r in ref.items():
        d = float((test[k].to(r.dtype) - r).abs().max())
        denom = max(float(r.abs().max()), floor)
        e = (d / denom) if denom > 0 else (0.0 if d == 0 else math.inf)
        per[k] = e
        if e > worst or worst_name is None:
            worst, worst_name = e, k
    return {"max_rel_error": worst, "worst_param": worst_name, "global_max_score": gmax,
            "params_above_1e-4": sum(e > 1e-4 for e in per.values()), "params": len(per)}
