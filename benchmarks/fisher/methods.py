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

try:  # fishkern versions before the self-check cache have no such function
    from fishkern.fisher import clear_self_check_cache
except ImportError:
    clear_self_check_cache = None

from .workloads import Workload, inputs_labels, iter_samples, logits

METHODS = ("fishkern", "fishkern-nocheck", "loop", "vmap", "backpack", "floor")
DEFAULT_METHODS = METHODS
SLOW_METHODS = ("loop", "vmap", "backpack")  # timed --slow-reps times, maybe on a subset
CHECKED_METHODS = ("vmap", "loop", "backpack")  # their scores are compared with fishkern's
LOOP_WARM_SAMPLES = 4
# the ratios a report gives: (numerator method, denominator method, name)
RATIOS = (("loop", "fishkern", "loop/fishkern"), ("vmap", "fishkern", "vmap/fishkern"),
          ("backpack", "fishkern", "backpack/fishkern"), ("fishkern", "floor", "fishkern/floor"),
          ("loop", "fishkern-nocheck", "loop/fishkern-nocheck"), ("fishkern", "fishkern-nocheck", "fishkern/fishkern-nocheck"),
          # the ceiling of loop/fishkern on this machine: what a Fisher pass as cheap as the floor would reach
          ("loop", "floor", "loop/floor"))


class NotRun(Exception):
    """A method that cannot run on this workload or machine (the report says why, the run goes on)."""


def has_self_check() -> bool:
    return "self_check" in inspect.signature(estimate_fisher).parameters


def run_fishkern(wl: Workload, n: int, impl: str, self_check: bool | None = None):
    """estimate_fisher as a user calls it. The self-check runs once per model structure per process
    and is then cached; the cache is cleared before every call, so each timed call pays for the
    check as a process's first pass does (``fishkern-nocheck`` passes ``self_check=False``)."""
    kw = {} if self_check is None else {"self_check": self_check}
    if clear_self_check_cache is not None:
        clear_self_check_cache()
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


# BackPACK: its SumGradSquared extension, on a deep copy of the model (its hooks store every
# module's input and output, which must not slow down or enlarge the other methods). The loss is
# reduction="sum" over the batch, so SumGradSquared is exactly sum_n (grad of loss_n)^2, the
# fishkern / loop Fisher; with "mean" it would be that times 1/B^2.
BACKPACK_LOSS_SCALE = 1.0  # sum reduction: no rescaling


def backpack_available() -> str | None:
    """None when BackPACK can be imported, else the reason it cannot."""
    try:
        import backpack  # noqa: F401
        from backpack.extensions import SumGradSquared  # noqa: F401
    except Exception as e:  # noqa: BLE001  not installed, or broken against this torch
        return f"backpack-for-pytorch not importable ({type(e).__name__}: {str(e)[:80]})"
    return None


def _short(e: BaseException, limit: int = 120) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:limit]}"


def backpack_model(wl: Workload):
    """BackPACK's extended copy of the model, built once per workload: first
    ``extend(copy, use_converter=True)`` (turns residual adds into modules BackPACK knows); where
    that fails, ``extend(copy)`` module by module (first-order extensions such as SumGradSquared
    only need the modules holding parameters to be supported). Returns (extended model, parameter
    names of the original in the extended model's parameter order, how it was extended). Raises
    NotRun with a short reason."""
    if "backpack" in wl.cache:
        cached = wl.cache["backpack"]
        if isinstance(cached, NotRun):
            raise cached
        return cached
    try:
        wl.cache["backpack"] = _build_backpack_model(wl)
    except NotRun as e:
        wl.cache["backpack"] = e
        raise
    return wl.cache["backpack"]


def _build_backpack_model(wl: Workload):
    import copy
    import warnings

    why = backpack_available()
    if why:
        raise NotRun(why)
    from backpack import extend

    names = [k for k, p in wl.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in wl.model.parameters() if p.requires_grad]
    how, converter_error = "converter", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ext = extend(copy.deepcopy(wl.model), use_converter=True)
            if [p.shape for p in ext.parameters() if p.requires_grad] != shapes:
                raise RuntimeError("the converted model's parameters differ from the original's")
        except Exception as e:  # noqa: BLE001  the converter traces with torch.fx, which many models refuse
            converter_error = _short(e, 80)
            how = "per module (converter: " + converter_error + ")"
            try:
                ext = extend(copy.deepcopy(wl.model))
            except Exception as e2:  # noqa: BLE001
                raise NotRun(f"extend failed: {_short(e2)}") from None
    ext.eval()
    return ext, names, how


def backpack_failure(e: BaseException) -> str:
    """Why BackPACK failed on a model, in a line (the known case explained)."""
    if "child module 'output'" in str(e):
        return ("BackPACK stores each module's output as the attribute `module.output`, which collides with "
                "the submodules named `output` of Hugging Face BERT layers (BertOutput, BertSelfOutput)")
    return f"BackPACK failed on this model: {_short(e)}"


def run_backpack(wl: Workload, n: int):
    """BackPACK's SumGradSquared over the samples, batch by batch, summed."""
    import warnings

    from backpack import backpack as bp_context
    from backpack.extensions import SumGradSquared

    model, names, how = backpack_model(wl)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in zip(names, params)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no extension for <container> although it has parameters", full-hook notes
        for b in iter_samples(wl.batches, n):
            model.zero_grad()
            inputs, labels = inputs_labels(wl, b)
            try:
                with bp_context(SumGradSquared()):
                    out = model(**inputs) if wl.hf else model(inputs)
                    F.cross_entropy(logits(out).float(), labels, reduction="sum").backward()
            except Exception as e:  # noqa: BLE001  BackPACK refuses or breaks on this model
                model.zero_grad()
                raise NotRun(backpack_failure(e)) from None
            missing = []
            for k, p in zip(names, params):
                sgs = getattr(p, "sum_grad_squared", None)
                if sgs is None:
                    missing.append(k)
                    continue
                acc[k].add_(sgs, alpha=BACKPACK_LOSS_SCALE)
                del p.sum_grad_squared
            if missing:
                owners = sorted({type(m).__name__ for m in model.modules()
                                 if any(p is q for p in m.parameters(recurse=False) for q in params
                                        if getattr(q, "sum_grad_squared", None) is None)})
                model.zero_grad()
                raise NotRun(f"no SumGradSquared for {len(missing)} of {len(names)} parameters "
                             f"(modules {', '.join(owners[:4])}{'…' if len(owners) > 4 else ''})")
    model.zero_grad()
    synchronize(params[0].device)
    return acc, {"extend": how}


def prepare(method: str, wl: Workload) -> None:
    """What a method builds once per workload, outside its timed and measured calls."""
    if method == "backpack":
        backpack_model(wl)


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
    if method == "backpack":
        return run_backpack(wl, n)
    if method == "floor":
        return run_floor(wl, n)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def measured_n(method: str, wl: Workload) -> int:
    return {"loop": wl.loop_n, "vmap": wl.vmap_n, "backpack": wl.backpack_n}.get(method, wl.n)


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
