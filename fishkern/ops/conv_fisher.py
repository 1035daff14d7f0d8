"""``fishkern::conv2d_fisher_acc_``: the diagonal empirical Fisher of a Conv2d weight over a batch,
added in place to an accumulator.

For ``y = conv2d(x, W, stride, padding, dilation, groups)`` (zero padding) and B samples, sample
n's weight gradient is ``G_n = conv2d_weight_grad(x[n], g[n])`` (Cout, Cin / groups, kh, kw), with
``g`` the gradient of the output (B, Cout, Ho, Wo); the op adds ``sum_n G_n ** 2`` to ``acc``.

Kernels (the dispatcher picks one by the tensors' device; callers never branch):

* ``default`` (any device, plain PyTorch, in this module), in one of two exact forms picked per
  layer by ``choose_form`` (or forced with ``form=``):

  - ``"grouped"``: the per-sample gradients of a chunk of c samples are ONE weight-gradient
    convolution: the chunk folded into the channels (input (1, c·Cin, H, W), output gradient
    (1, c·Cout, Ho, Wo)) with c·groups groups, so torch's own conv backward (oneDNN on CPU, cuDNN
    on CUDA) computes all c gradients in one call at the cost of the batch weight gradient. Best
    when a sample has many output positions (early, wide-image layers).
  - ``"unfold"``: im2col (``F.unfold``) of the chunk, then one GEMM per sample into a reused
    buffer, cache-resident for small images. Best for late layers with few output positions,
    where the grouped convolution's per-group overhead dominates.

  - ``"fused"`` (the ``cpu`` kernel only, where the native extension is loaded): im2col as in
    ``unfold``, then the Linear Fisher's register-tiled native form
    (``linear_fisher.py``, ``csrc/linear_fisher_cpu.cpp``) with the output positions as tokens: each
    sample's gradient tile is summed over its positions and squared in registers, so no per-sample
    gradient is written and acc is read once per chunk of samples, not once per sample. Best for
    the late layers (few positions, a large Cout x Cin·kh·kw gradient whose per-sample squaring
    pass dominates the unfold form). Elsewhere a forced "fused" runs the unfold form.

  The grouped and unfold forms square and sum in place (``acc.addcmul_(G_n, G_n)`` per sample: the squares are never a
  separate tensor, and the sum never a strided reduction over the sample dimension) and chunk the
  samples so that at most ``chunk_elems`` per-sample entries exist at once. Products are formed in
  the accumulator's dtype (bf16 / fp16 inputs are upcast exactly).
* ``cpu`` (``conv2d_fisher_cpu_``): the default kernel's forms plus ``fused``, by ``choose_form``.
* ``cuda`` (Triton, ``conv_fisher_triton.py``, imported on the first CUDA call): implicit im2col,
  each sample's gradient tile formed and squared in registers, deterministic. float64 inputs, or
  no usable triton, run the default kernel.

Argument rules (checked by every kernel and by the fake, with the messages below): x (B, Cin, H, W)
and g (B, Cout, Ho, Wo) with (Ho, Wo) the output size of the geometry; one dtype among float32 /
bfloat16 / float16 (or both float64); acc contiguous (Cout, Cin / groups, kh, kw), float32 (float64
for float64 inputs); one device; stride and dilation >= 1, padding >= 0, groups dividing Cin and
Cout. Non-zero padding modes (reflect, replicate, circular) are the caller's: pad x, pass padding 0.

Importing this module declares the op and registers the CUDA kernel's Python launcher; it never
imports triton or touches CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import library
from . import linear_fisher as lf
from .triton_support import triton_usable_on

NAME = "conv2d_fisher_acc_"
DEFAULT_CHUNK_ELEMS = 1 << 21  # per-sample entries alive at once in the default kernel (8 MiB in fp32)
FORMS = ("auto", "grouped", "unfold", "fused")
SCHEMA = (
    "(Tensor(a!) acc, Tensor x, Tensor g, int[2] stride, int[2] padding, int[2] dilation, int groups, *, "
    f"str form='auto', int chunk_elems={DEFAULT_CHUNK_ELEMS}) -> ()"
)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # with a float32 acc

# "auto": the grouped form from this many output positions per sample (Ho * Wo) up. Measured on
# ResNet-34's layers, batch 64, 2-core Xeon (benchmarks/results/conv_fisher_forms_cpu.md): the grouped
# form wins 3.0x at 32x32 outputs and 1.65x at 16x16, and loses 1.7x at 8x8 and 2.9x at 4x4.
GROUPED_MIN_POSITIONS = 192
# The CPU kernel's fused form up to this many output positions: on ResNet-34's 4x4 layers (16
# positions, batch 64, 2-core AMD EPYC, AVX-512) it takes 0.70x the unfold form's time, on its 8x8
# layers (64) 1.3x (benchmarks/results/conv_fisher_forms_cpu.md). Its per-position cost is higher
# than a GEMM's over im2col's long rows; what it saves is the per-sample squaring pass, which only
# dominates with few positions.
FUSED_MAX_POSITIONS = 32
# The grouped form's chunk: enough samples per call to amortise its setup, few enough to stay in
# cache (the best of 1..64 on the layers above was 8-16).
GROUPED_CHUNK = 16


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _pair(v, what: str) -> tuple[int, int]:
    op = library.qualname(NAME)
    vals = [v, v] if isinstance(v, int) else list(v)
    torch._check_value(len(vals) == 2 and all(isinstance(a, int) for a in vals),
                       lambda: f"{op}: {what} must be an int or two ints, got {v!r}")
    return int(vals[0]), int(vals[1])


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_arguments(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int,
                    form: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
    """Every check that needs no tensor data (run by the fake and by every kernel); ValueError."""
    op = library.qualname(NAME)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    torch._check_value(min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0,
                       lambda: f"{op}: stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
                       f"padding {padding}, dilation {dilation}")
    torch._check_value(form in FORMS, lambda: f"{op}: form must be one of {FORMS}, got {form!r}")
    torch._check_value(chunk_elems >= 1, lambda: f"{op}: chunk_elems must be >= 1, got {chunk_elems}")
    torch._check_value(isinstance(x, Tensor) and x.dim() == 4,
                       lambda: f"{op}: x must be a 4-D tensor (B, Cin, H, W), got shape {_shape(x)}")
    torch._check_value(isinstance(g, Tensor) and g.dim() == 4,
                       lambda: f"{op}: g must be a 4-D tensor (B, Cout, Ho, Wo), got shape {_shape(g)}")
    torch._check_value(isinstance(acc, Tensor) and acc.dim() == 4,
                       lambda: f"{op}: acc must be a 4-D tensor (Cout, Cin / groups, kh, kw), got shape {_shape(acc)}")
    batch, cin, h, w = x.shape
    cout, cin_g, kh, kw = acc.shape
    torch._check_value(isinstance(groups, int) and groups >= 1 and cin == cin_g * groups and cout % groups == 0,
                       lambda: f"{op}: acc {_shape(acc)} with groups={groups} does not fit x with {cin} input channels "
                       f"(needs Cin = acc.shape[1] * groups and Cout divisible by groups)")
    ho, wo = output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw)
    want = (batch, cout, max(ho, 0), max(wo, 0))
    torch._check_value(tuple(g.shape) == want,
                       lambda: f"{op}: g must have shape (B, Cout, Ho, Wo) = {want} for x {_shape(x)}, kernel "
                       f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}; got {_shape(g)}")
    wide = x.dtype == torch.float64 and g.dtype == torch.float64
    torch._check_value(
        wide or (x.dtype in INPUT_DTYPES and g.dtype == x.dtype),
        lambda: f"{op}: x and g must share one dtype among float32, bfloat16, float16 (or both be float64 "
        f"with a float64 acc); got {x.dtype} and {g.dtype}",
    )
    need = torch.float64 if wide else torch.float32
    torch._check_value(acc.dtype == need, lambda: f"{op}: acc must be float32 (float64 for float64 x and g), got "
                                                  f"{acc.dtype} for {x.dtype} inputs")
    torch._check_value(acc.is_contiguous(), lambda: f"{op}: acc must be contiguous")
    torch._check_value(x.device == acc.device and g.device == acc.device,
                       lambda: f"{op}: acc ({acc.device}), x ({x.device}) and g ({g.device}) must be on one device")


def _fake(acc, x, g, stride, padding, dilation, groups, *, form="auto", chunk_elems=DEFAULT_CHUNK_ELEMS):
    check_arguments(acc, x, g, stride, padding, dilation, groups, form, chunk_elems)


def choose_form(positions: int, fused: bool = False) -> str:
    """The form for a layer with ``positions`` = Ho * Wo output positions: grouped from
    GROUPED_MIN_POSITIONS up; below, with ``fused`` (the CPU kernel with the native extension)
    the fused form up to FUSED_MAX_POSITIONS, else unfold."""
    if positions >= GROUPED_MIN_POSITIONS:
        return "grouped"
    return "fused" if fused and positions <= FUSED_MAX_POSITIONS else "unfold"


def _chunk_size(per_sample: int, budget: int, cap: int | None = None) -> int:
    step = max(1, budget // max(1, per_sample))
    return min(step, cap) if cap else step


def _add_squares(acc: Tensor, grads: Tensor) -> None:
    """acc += sum_n grads[n] ** 2, one fused multiply-add per sample (no squared copy, no strided
    reduction over n)."""
    for n in range(grads.shape[0]):
        acc.addcmul_(grads[n], grads[n])


def _grouped_form(acc, x, g, stride, padding, dilation, groups, chunk_elems) -> None:
    batch, cin, h, w = x.shape
    cout = g.shape[1]
    dt = acc.dtype
    step = _chunk_size(acc.numel(), chunk_elems, GROUPED_CHUNK)
    for s in range(0, batch, step):
        c = min(batch, s + step) - s
        xs = x[s:s + c].to(dt).reshape(1, c * cin, h, w)
        gs = g[s:s + c].to(dt).reshape(1, c * cout, *g.shape[2:])
        # Only the weight's shape is read by the weight-gradient pass: an expanded scalar.
        weight = xs.new_empty(1).expand(c * cout, *acc.shape[1:])
        _, grads, _ = torch.ops.aten.convolution_backward(
            gs, xs, weight, None, stride, padding, dilation, False, [0, 0], c * groups, [False, True, False])
        _add_squares(acc, grads.view(c, *acc.shape))


def _unfold_form(acc, x, g, stride, padding, dilation, groups, chunk_elems) -> None:
    batch = x.shape[0]
    cout, cin_g, kh, kw = acc.shape
    dt = acc.dtype
    cols_g = cin_g * kh * kw
    positions = g.shape[2] * g.shape[3]
    # the chunk bounds the unfolded input and the output gradient; the per-sample gradient is one
    # buffer, reused
    step = _chunk_size((groups * cols_g + cout) * positions, chunk_elems)
    acc_g = acc.view(groups, cout // groups, cols_g)
    buf = torch.empty_like(acc_g)
    for s in range(0, batch, step):
        c = min(batch, s + step) - s
        cols = F.unfold(x[s:s + c].to(dt), (kh, kw), dilation, padding, stride).view(c, groups, cols_g, positions)
        gs = g[s:s + c].to(dt).reshape(c, groups, cout // groups, positions)
        for n in range(c):
            if groups == 1:  # mm: the plain GEMM path (bmm of one matrix is slower on CPU)
                torch.mm(gs[n, 0], cols[n, 0].t(), out=buf[0])
            else:
                torch.bmm(gs[n], cols[n].transpose(1, 2), out=buf)
            acc_g.addcmul_(buf, buf)


def _fused_form(acc, x, g, stride, padding, dilation, groups, chunk_elems) -> None:
    """im2col of a chunk, then per group the native register-tiled Linear Fisher form over
    (samples, positions, Cin/groups·kh·kw) and (samples, positions, Cout/groups)."""
    batch = x.shape[0]
    cout, cin_g, kh, kw = acc.shape
    dt = acc.dtype
    cols_g, cout_g = cin_g * kh * kw, cout // groups
    positions = g.shape[2] * g.shape[3]
    # the chunk bounds the unfolded input and its transposed copy
    step = _chunk_size(2 * (groups * cols_g + cout) * positions, chunk_elems)
    acc_g = acc.view(groups, cout_g, cols_g)
    for s in range(0, batch, step):
        c = min(batch, s + step) - s
        cols = F.unfold(x[s:s + c].to(dt), (kh, kw), dilation, padding, stride).view(c, groups, cols_g, positions)
        gs = g[s:s + c].to(dt).reshape(c, groups, cout_g, positions)
        for k in range(groups):
            lf._fused_form(acc_g[k], cols[:, k].transpose(1, 2), gs[:, k].transpose(1, 2), [positions] * c, dt)


def _run(acc, x, g, stride, padding, dilation, groups, form, chunk_elems, fused: bool) -> Tensor:
    check_arguments(acc, x, g, stride, padding, dilation, groups, form, chunk_elems)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    positions = g.shape[2] * g.shape[3]
    if acc.numel() == 0 or x.shape[0] == 0 or positions == 0:
        return acc  # no weight, no sample, or no output position: every gradient is empty or zero
    if form == "auto":
        form = choose_form(positions, fused=fused)
    elif form == "fused" and not fused:
        form = "unfold"  # forced where the native form cannot run: the same sums, one GEMM per sample
    run = {"grouped": _grouped_form, "unfold": _unfold_form, "fused": _fused_form}[form]
    run(acc, x, g, stride, padding, dilation, groups, chunk_elems)
    return acc


def conv2d_fisher_default_(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int, *,
                           form: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """The default (plain PyTorch) kernel, callable directly on any device; returns ``acc``. It
    never runs the native fused form (forced, it runs the unfold form)."""
    return _run(acc, x, g, stride, padding, dilation, groups, form, chunk_elems, fused=False)


def conv2d_fisher_cpu_(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int, *,
                       form: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """The CPU kernel called directly: the default kernel's forms and, where the native extension is
    loaded, the fused form (chosen by ``choose_form``); returns ``acc``."""
    return _run(acc, x, g, stride, padding, dilation, groups, form, chunk_elems,
                fused=x.device.type == "cpu" and lf.fused_available())


def _cpu_kernel(acc, x, g, stride, padding, dilation, groups, *, form="auto", chunk_elems=DEFAULT_CHUNK_ELEMS):
    conv2d_fisher_cpu_(acc, x, g, stride, padding, dilation, groups, form=form, chunk_elems=chunk_elems)


def _default_kernel(acc, x, g, stride, padding, dilation, groups, *, form="auto", chunk_elems=DEFAULT_CHUNK_ELEMS):
    conv2d_fisher_default_(acc, x, g, stride, padding, dilation, groups, form=form, chunk_elems=chunk_elems)


def conv2d_fisher_triton_(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """The Triton kernel called directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
    ``conv_fisher_triton.py``, imported on the first call); returns ``acc``. float32 acc, inputs
    float32 / bfloat16 / float16; fp32 inputs multiplied exactly (no TF32); deterministic."""
    check_arguments(acc, x, g, stride, padding, dilation, groups)
    if acc.dtype != torch.float32:
        raise ValueError(f"the Triton conv Fisher kernel takes a float32 acc and float32 / bfloat16 / float16 "
                         f"inputs, got {acc.dtype} (fishkern::{NAME} runs float64 on its default kernel)")
    if not triton_usable_on(acc.device):
        raise RuntimeError(
            f"the Triton conv Fisher kernel cannot run on {acc.device} tensors here: it needs CUDA tensors, or "
            "CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    from . import conv_fisher_triton

    conv_fisher_triton.launch(acc, x, g, _pair(stride, "stride"), _pair(padding, "padding"),
                              _pair(dilation, "dilation"), groups)
    return acc


def _cuda_kernel(acc, x, g, stride, padding, dilation, groups, *, form="auto", chunk_elems=DEFAULT_CHUNK_ELEMS):
    # "auto" on CUDA is the Triton kernel; a forced form, float64, or no usable triton: the default
    check_arguments(acc, x, g, stride, padding, dilation, groups, form, chunk_elems)
    if form != "auto" or acc.dtype != torch.float32 or not triton_usable_on(acc.device):
        conv2d_fisher_default_(acc, x, g, stride, padding, dilation, groups, form=form, chunk_elems=chunk_elems)
        return
    conv2d_fisher_triton_(acc, x, g, stride, padding, dilation, groups)


OP = library.define(NAME, SCHEMA, fake=_fake, default=_default_kernel,
                    doc="acc += sum_n (Conv2d weight gradient of sample n)**2 (Conv2d Fisher)")
library.register_kernel(NAME, "cuda", _cuda_kernel)
library.register_kernel(NAME, "cpu", _cpu_kernel)


def conv2d_fisher_acc_(acc: Tensor, x: Tensor, g: Tensor, stride=1, padding=0, dilation=1, groups: int = 1, *,
                       form: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """``torch.ops.fishkern.conv2d_fisher_acc_`` (the kernel for the tensors' device); returns ``acc``.

    Args:
        acc: (Cout, Cin / groups, kh, kw) contiguous accumulator, float32 (float64 for float64 inputs).
        x: the layer's input (B, Cin, H, W), any strides; zero padding ``padding`` is implied.
        g: gradient of the layer's output (B, Cout, Ho, Wo), x's dtype.
        stride, padding, dilation: ints or pairs, as nn.Conv2d's; groups as nn.Conv2d's.
        form: the default kernel's form ("grouped", "unfold", "fused" on CPU with the native
            extension; "auto" picks per layer, and on CUDA means the Triton kernel).
        chunk_elems: the default kernel's bound on per-sample entries alive at once.
    """
    OP(acc, x, g, list(_pair(stride, "stride")), list(_pair(padding, "padding")),
       list(_pair(dilation, "dilation")), groups, form=form, chunk_elems=chunk_elems)
    return acc


def conv2d_fisher_reference(x: Tensor, g: Tensor, weight_shape, stride=1, padding=0, dilation=1,
                            groups: int = 1) -> Tensor:
    """``sum_n conv2d_weight(x[n], g[n]) ** 2`` in float64, one sample at a time with autograd of
    F.conv2d: the oracle for tests."""
    out = torch.zeros(weight_shape, dtype=torch.float64, device=x.device)
    for n in range(x.shape[0]):
        w = torch.zeros(weight_shape, dtype=torch.float64, device=x.device, requires_grad=True)
        y = F.conv2d(x[n:n + 1].double(), w, None, stride, padding, dilation, groups)
        (grad,) = torch.autograd.grad(y, w, g[n:n + 1].double())
        out += grad * grad
    return out

