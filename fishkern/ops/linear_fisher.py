"""``fishkern::linear_fisher_acc_``: the diagonal empirical Fisher of a Linear weight over a batch of
sequences, added in place to an accumulator.

For ``y = x @ W.T`` applied to B sequences, sample b's weight gradient is
``G_b = sum_{t < len_b} g[b, t, :, None] * x[b, t, None, :]`` (OUT x IN) with ``x`` the layer input
(B, T, IN) and ``g`` the gradient of the output (B, T, OUT); the op adds ``sum_b G_b ** 2``:

    acc[o, i] += sum_b (sum_{t < lengths[b]} g[b, t, o] * x[b, t, i]) ** 2

Kernels (the dispatcher picks one by the tensors' device; callers never branch):

* ``default`` (any device, plain PyTorch, in this module), in the cheaper of two exact forms by a
  cost model over (T, the samples' lengths, ``choose_form``): the per-sample form, one GEMM per
  sample over its own tokens into a reused OUT x IN buffer, squared into ``acc`` in place with
  ``addcmul_`` (on devices other than the CPU, where lengths stay on the device: ``bmm`` over
  chunks of at most ``chunk_elems`` per-sample entries, padding masked); or, for short sequences,
  the token-pair form (one GEMM over token pairs, no per-sample gradient in memory). Products of the
  inputs are formed in the accumulator's dtype (bf16 / fp16 inputs are upcast exactly), so fp32
  inputs and the Triton kernel's fp32-accumulated dot agree to fp32 rounding. Padded tokens
  (``t >= lengths[b]``) are masked out with ``torch.where``, so NaN / inf there never reach ``acc``.
* ``cpu`` (``linear_fisher_cpu_``): the default kernel's forms plus, where the native extension is
  loaded, the register-tiled form ``fused`` (``csrc/linear_fisher_cpu.cpp``): a 6 x 16 tile of one
  sample's gradient is summed over its tokens in registers, squared there and added to acc's tile,
  which stays in cache while a chunk of samples passes over it; no per-sample gradient is stored and
  acc is read once per chunk, not once per sample. The cost model picks it over the per-sample form
  up to a few hundred tokens per sample (2-3x faster for classification-length samples, even at
  T = 128 on the AMD EPYC it was measured on; MKL's per-sample GEMMs win from T ~ 256). Float32 and
  float64 (bf16 / fp16 inputs upcast); deterministic for any thread count (each thread owns whole
  rows of acc, samples and tokens are summed in order).
* ``cuda`` (``linear_fisher_triton_``: Triton, ``linear_fisher_triton.py``, imported on the first
  CUDA call): each sample's
  gradient tile is formed in registers and squared there; no per-sample gradient in memory, and the
  result is deterministic (fixed-order reduction over sample splits). Inputs the Triton kernel
  does not take (float64, or triton missing / too old) run the default kernel.

Argument rules (checked by every kernel and by the fake, with the messages below): acc contiguous,
float32 (or float64 when x and g are float64) and of shape (OUT, IN); x and g 3-D with equal (B, T),
one dtype among float32 / bfloat16 / float16 (or float64); lengths, if given, an integer (B,)
tensor on acc's device with values in [0, T]. Checking the values costs a device sync on CUDA:
``check_lengths=False`` skips it for lengths known valid (the Fisher estimator's, which come from
an attention mask); unchecked values outside [0, T] are clamped to it by every kernel (never an
out-of-bounds read), i.e. they silently count as 0 or T tokens.

Importing this module declares the op and registers the CUDA kernel's Python launcher; it never
imports triton or touches CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._native import ensure_loaded
from . import library
from .triton_support import triton_usable_on

NAME = "linear_fisher_acc_"
DEFAULT_CHUNK_ELEMS = 1 << 21  # per-sample entries alive at once in the default kernel (8 MiB in fp32)
SCHEMA = (
    "(Tensor(a!) acc, Tensor x, Tensor g, Tensor? lengths=None, *, bool check_lengths=True, "
    f"int chunk_elems={DEFAULT_CHUNK_ELEMS}) -> ()"
)

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # with a float32 acc
LENGTH_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# The cost model's price of squaring one sample's gradient into acc (acc.addcmul_), in OUT x IN
# multiply-adds: measured on MiniLM's layers (384x384, 1536x384), batch 32, CPU, by the T where the
# token-pair form and the per-sample form take equal time (T = 4-5: 2 * 10 or 15 = 2 * 4.5 + 12).
ADDCMUL_COST = 12
# The fused form (CPU, native): per token of a sample FUSED_TOKEN_COST, per sample FUSED_SAMPLE_COST
# (its tile epilogue), in the same units; fitted to its time against the per-sample form on MiniLM's
# layer shapes, batch 32, T = 4-512, 2 threads of an AMD EPYC (AVX2 + FMA): 0.44x the per-sample time
# at T = 4, 0.64x at 32, ~1.0x at 128-256, 1.0-1.5x at 512.
FUSED_TOKEN_COST = 2.1
FUSED_SAMPLE_COST = 1.0


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def check_arguments(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None) -> None:
    """Every check that needs no tensor data (run by the fake and by every kernel); ValueError."""
    op = f"{library.NAMESPACE}::{NAME}"
    torch._check_value(isinstance(x, Tensor) and x.dim() == 3,
                       lambda: f"{op}: x must be a 3-D tensor (B, T, IN), got shape {_shape(x)}")
    torch._check_value(isinstance(g, Tensor) and g.dim() == 3,
                       lambda: f"{op}: g must be a 3-D tensor (B, T, OUT), got shape {_shape(g)}")
    torch._check_value(x.shape[0] == g.shape[0] and x.shape[1] == g.shape[1],
                       lambda: f"{op}: x {_shape(x)} and g {_shape(g)} must agree on (B, T)")
    wide = x.dtype == torch.float64 and g.dtype == torch.float64
    torch._check_value(
        wide or (x.dtype in INPUT_DTYPES and g.dtype == x.dtype),
        lambda: f"{op}: x and g must share one dtype among float32, bfloat16, float16 (or both be float64 "
        f"with a float64 acc); got {x.dtype} and {g.dtype}",
    )
    out_features, in_features = g.shape[2], x.shape[2]
    torch._check_value(
        isinstance(acc, Tensor) and acc.dim() == 2 and acc.shape[0] == out_features and acc.shape[1] == in_features,
        lambda: f"{op}: acc must have shape (OUT, IN) = ({out_features}, {in_features}), got {_shape(acc)}",
    )
    want = torch.float64 if wide else torch.float32
    torch._check_value(acc.dtype == want, lambda: f"{op}: acc must be float32 (float64 for float64 x and g), got "
                                                   f"{acc.dtype} for {x.dtype} inputs")
    torch._check_value(acc.is_contiguous(), lambda: f"{op}: acc must be contiguous")
    torch._check_value(x.device == acc.device and g.device == acc.device,
                       lambda: f"{op}: acc ({acc.device}), x ({x.device}) and g ({g.device}) must be on one device")
    if lengths is not None:
        torch._check_value(isinstance(lengths, Tensor) and lengths.dim() == 1 and lengths.shape[0] == x.shape[0],
                           lambda: f"{op}: lengths must have shape (B,) = ({x.shape[0]},), got {_shape(lengths)}")
        torch._check_value(lengths.dtype in LENGTH_DTYPES,
                           lambda: f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
        torch._check_value(lengths.device == acc.device,
                           lambda: f"{op}: lengths ({lengths.device}) must be on the device of acc ({acc.device})")


def check_length_values(lengths: Tensor | None, seq: int) -> None:
    """lengths in [0, T]; one device sync on CUDA (a single transfer of min and max)."""
    if lengths is None or lengths.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
    if lo < 0 or hi > seq:
        raise ValueError(f"{library.NAMESPACE}::{NAME}: lengths must lie in [0, T] = [0, {seq}], "
                         f"got values in [{lo}, {hi}]")


def _check_chunk(chunk_elems: int) -> None:
    torch._check_value(chunk_elems >= 1,
                       lambda: f"{library.NAMESPACE}::{NAME}: chunk_elems must be >= 1, got {chunk_elems}")


def _fake(acc, x, g, lengths=None, *, check_lengths=True, chunk_elems=DEFAULT_CHUNK_ELEMS):
    check_arguments(acc, x, g, lengths)
    _check_chunk(chunk_elems)


def _chunks(total: int, per_item: int, budget: int):
    step = max(1, budget // max(1, per_item))
    for s in range(0, total, step):
        yield s, min(total, s + step)


def linear_fisher_default_(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None = None, *,
                           check_lengths: bool = True, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """The default (plain PyTorch) kernel, callable directly on any device; returns ``acc``."""
    return _run(acc, x, g, lengths, check_lengths, chunk_elems, fused=False)


def _run(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, check_lengths: bool, chunk_elems: int,
         fused: bool) -> Tensor:
    check_arguments(acc, x, g, lengths)
    _check_chunk(chunk_elems)
    if check_lengths:
        check_length_values(lengths, x.shape[1])
    if acc.numel() == 0 or x.shape[0] == 0 or x.shape[1] == 0:
        return acc
    _accumulate(acc, x, g, lengths, chunk_elems, fused)
    return acc


def _accumulate(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, chunk_elems: int, fused: bool) -> None:
    """The form chosen by the cost model, run (arguments checked; ``fused``: the native form may run)."""
    batch, seq, _ = x.shape
    dt = acc.dtype
    # Lengths on the host (CPU tensors: free) let each sample stop at its own length; on another
    # device the full T is used, masked, so that no call syncs.
    host = None
    if x.device.type == "cpu":
        host = [seq] * batch if lengths is None else [min(max(int(v), 0), seq) for v in lengths.tolist()]
    t_eff = max(host) if host is not None else seq
    if t_eff == 0:
        return
    form = choose_form(t_eff, host if host is not None else [seq] * batch, fused=fused and host is not None)
    if form == "fused" and not (fused and host is not None):
        form = "per_sample"  # forced (tests) where the native form cannot run: the nearest exact form
    if form == "fused":
        _fused_form(acc, x, g, host, dt)
    elif form == "pairs":
        _pairs_form(acc, x[:, :t_eff], g[:, :t_eff], lengths, dt, chunk_elems)
    elif form == "per_sample" and host is not None:
        _per_sample_host(acc, x, g, host, dt)
    else:
        _per_sample_chunks(acc, x, g, lengths, dt, chunk_elems)


# "chunks": the per-sample form with lengths on the device; "fused": the CPU kernel's native form
FORMS = ("pairs", "per_sample", "chunks", "fused")


def choose_form(t_max: int, sample_lengths, fused: bool = False) -> str:
    """The form ("pairs", "per_sample" or, with ``fused``, "fused") by a cost model in units of
    OUT x IN multiply-adds: the token-pair form costs 2 per pair (t <= t' < t_max) per sample; the
    per-sample form 2 per token plus ADDCMUL_COST per sample (the in-place square-and-add pass over
    its gradient, memory-bound); the fused form FUSED_TOKEN_COST per token plus FUSED_SAMPLE_COST
    per sample. Ties go to the earlier of pairs, fused, per_sample."""
    active = [n for n in sample_lengths if n > 0]
    costs = {"pairs": len(sample_lengths) * t_max * (t_max + 1)}
    if fused:
        costs["fused"] = sum(FUSED_TOKEN_COST * n + FUSED_SAMPLE_COST for n in active)
    costs["per_sample"] = sum(2 * n + ADDCMUL_COST for n in active)
    return min(costs, key=costs.get)


def fused_available() -> bool:
    """Whether the native fused CPU form is loaded (the extension, with its internal op)."""
    return ensure_loaded() and hasattr(torch.ops.fishkern, "linear_fisher_fused_cpu_")


def _fused_form(acc: Tensor, x: Tensor, g: Tensor, lengths: list[int], dt) -> None:
    """The native register-tiled form (csrc/linear_fisher_cpu.cpp): operands in acc's dtype with a
    unit last stride, the samples' lengths (already clamped to [0, T]) as an int64 tensor."""
    x, g = x.to(dt), g.to(dt)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if g.stride(-1) != 1:
        g = g.contiguous()
    torch.ops.fishkern.linear_fisher_fused_cpu_(acc, x, g, torch.tensor(lengths, dtype=torch.int64))


def _per_sample_host(acc: Tensor, x: Tensor, g: Tensor, lengths: list[int], dt) -> None:
    """One GEMM per sample over its own tokens into a reused buffer, squared into acc in place
    (no per-sample gradient batch, no strided reduction over samples)."""
    buf = torch.empty_like(acc)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        torch.mm(g[b, :n].t().to(dt), x[b, :n].to(dt), out=buf)
        acc.addcmul_(buf, buf)


def _per_sample_chunks(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, dt, chunk_elems: int) -> None:
    """Per-sample gradients by bmm over chunks of samples (lengths on the device: padding masked,
    no sync), each squared into acc in place."""
    batch, seq, _ = x.shape
    for s, e in _chunks(batch, acc.numel(), chunk_elems):
        xs, gs = x[s:e].to(dt), g[s:e].to(dt)
        if lengths is not None:
            keep = (torch.arange(seq, device=x.device)[None, :] < lengths[s:e, None])[..., None]
            xs, gs = torch.where(keep, xs, 0), torch.where(keep, gs, 0)
        grad = torch.bmm(gs.transpose(1, 2), xs)  # (c, OUT, IN)
        for n in range(grad.shape[0]):
            acc.addcmul_(grad[n], grad[n])


def _pairs_form(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, dt, chunk_elems: int) -> None:
    """(G_b)**2 [o, i] = sum_{t, t'} (g_to g_t'o)(x_ti x_t'i): with one row per token pair t <= t'
    of each sample (off-diagonal pairs weighted 2), sum_b G_b**2 = A.T @ C, a single GEMM whose
    inner size is the number of pairs. Pairs past a sample's length are masked to zero."""
    batch, seq, in_features = x.shape
    out_features = g.shape[2]
    t0, t1 = torch.triu_indices(seq, seq, device=x.device)  # (P,) each: t0 <= t1
    weight = torch.where(t0 == t1, 1.0, 2.0).to(dt)[:, None]
    pairs = t0.numel()
    for s, e in _chunks(batch, pairs * (out_features + in_features), chunk_elems):
        gs, xs = g[s:e].to(dt), x[s:e].to(dt)
        a = gs[:, t0] * gs[:, t1] * weight  # (c, P, OUT)
        c = xs[:, t0] * xs[:, t1]  # (c, P, IN)
        if lengths is not None:
            keep = (t1[None, :] < lengths[s:e, None])[..., None]  # t0 <= t1: t1 decides
            a, c = torch.where(keep, a, 0), torch.where(keep, c, 0)
        acc.addmm_(a.reshape(-1, out_features).t(), c.reshape(-1, in_features))


def _default_kernel(acc, x, g, lengths=None, *, check_lengths=True, chunk_elems=DEFAULT_CHUNK_ELEMS):
    linear_fisher_default_(acc, x, g, lengths, check_lengths=check_lengths, chunk_elems=chunk_elems)


def linear_fisher_cpu_(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None = None, *,
                       check_lengths: bool = True, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """The CPU kernel called directly: the default kernel's forms and, where the native extension is
    loaded, the fused form, by the cost model; returns ``acc``."""
    return _run(acc, x, g, lengths, check_lengths, chunk_elems, fused=fused_available())


def _cpu_kernel(acc, x, g, lengths=None, *, check_lengths=True, chunk_elems=DEFAULT_CHUNK_ELEMS):
    linear_fisher_cpu_(acc, x, g, lengths, check_lengths=check_lengths, chunk_elems=chunk_elems)


def linear_fisher_triton_(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None = None, *,
                          check_lengths: bool = True) -> Tensor:
    """The Triton kernel called directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
    ``linear_fisher_triton.py``, imported on the first call); returns ``acc``.

    acc: float32 (OUT, IN) contiguous; x (B, T, IN) and g (B, T, OUT) float32 / bfloat16 / float16,
    one dtype, any strides; lengths: optional integer (B,) tensor (tokens t >= lengths[b] are not
    read). ``check_lengths`` checks that lengths lie in [0, T] (one device sync); without it values
    outside are clamped to [0, T] in the kernel. fp32 inputs are multiplied exactly (no TF32); bf16 /
    fp16 inputs in their dtype with fp32 accumulation. Deterministic: the same inputs give
    bit-identical results on every run (fixed-order reduction over sample splits, no atomics).
    """
    check_arguments(acc, x, g, lengths)
    if acc.dtype != torch.float32:
        raise ValueError(f"the Triton Fisher kernel takes a float32 acc and float32 / bfloat16 / float16 inputs, "
                         f"got {acc.dtype} (fishkern::{NAME} runs float64 on its default kernel)")
    if check_lengths:
        check_length_values(lengths, x.shape[1])
    if not triton_usable_on(acc.device):
        raise RuntimeError(
            f"the Triton Fisher kernel cannot run on {acc.device} tensors here: it needs CUDA tensors, or "
            "CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    if acc.numel() == 0 or x.shape[0] == 0 or x.shape[1] == 0:
        return acc
    from . import linear_fisher_triton

    linear_fisher_triton.launch(acc, x, g, lengths)
    return acc


def _cuda_kernel(acc, x, g, lengths=None, *, check_lengths=True, chunk_elems=DEFAULT_CHUNK_ELEMS):
    _check_chunk(chunk_elems)
    # both paths below run check_arguments
    if acc.dtype != torch.float32 or not triton_usable_on(acc.device):
        # float64, or no usable triton (triton_usable_on warns once about a too-old one)
        linear_fisher_default_(acc, x, g, lengths, check_lengths=check_lengths, chunk_elems=chunk_elems)
        return
    linear_fisher_triton_(acc, x, g, lengths, check_lengths=check_lengths)


OP = library.define(NAME, SCHEMA, fake=_fake, default=_default_kernel,
                    doc="acc[o, i] += sum_b (sum_{t < lengths[b]} g[b, t, o] x[b, t, i])**2 (Linear Fisher)")
library.register_kernel(NAME, "cuda", _cuda_kernel)
library.register_kernel(NAME, "cpu", _cpu_kernel)


def linear_fisher_acc_(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None = None, *,
                       check_lengths: bool = True, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """``torch.ops.fishkern.linear_fisher_acc_`` (the kernel for the tensors' device); returns ``acc``.

    Args:
        acc: (OUT, IN) contiguous accumulator, float32 (float64 for float64 inputs), updated in place.
        x: layer input (B, T, IN), any strides.
        g: gradient of the layer output (B, T, OUT), x's dtype, any strides.
        lengths: optional integer (B,) tensor: only tokens t < lengths[b] of sample b count (right
            padding; the others are not read by the Triton kernel and masked by the default one).
        check_lengths: check that lengths lie in [0, T] (a device sync on CUDA); False for lengths
            known valid (unchecked values are clamped to [0, T]).
        chunk_elems: the default kernel's bound on per-sample entries alive at once.

    fp32 inputs are multiplied exactly (no TF32 in the Triton kernel; the default kernel follows
    torch's matmul precision settings); bf16 / fp16 inputs with fp32 accumulation.
    """
    OP(acc, x, g, lengths, check_lengths=check_lengths, chunk_elems=chunk_elems)
    return acc


def linear_fisher_reference(x: Tensor, g: Tensor, lengths: Tensor | None = None) -> Tensor:
    """``sum_b (g[b, :lengths[b]].T @ x[b, :lengths[b]]) ** 2`` in float64 (OUT, IN), one sample at a
    time in plain torch: the oracle for tests."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"x (B, T, IN) and g (B, T, OUT) must be 3-D with equal (B, T), got {tuple(x.shape)}, {tuple(g.shape)}"
        )
    out = torch.zeros(g.shape[2], x.shape[2], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        n = x.shape[1] if lengths is None else int(lengths[b])
        grad = torch.einsum("to,ti->oi", g[b, :n].double(), x[b, :n].double())
        out += grad * grad
    return out
