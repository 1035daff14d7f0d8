#!/usr/bin/env python3
"""Ahead-of-time compile gate for fishkern's Triton kernels: no GPU, no CUDA torch needed.

fishkern's real host code (the MaskedAdamW / MaskedSGD step path, the launchers of the Triton kernels
of ``fishkern::linear_fisher_acc_``, ``fishkern::conv2d_fisher_acc_`` and ``fishkern::sampled_matmul``) is driven on CPU tensors with ``JITFunction.run`` replaced: instead of
launching, it runs Triton's own argument binder, so each launch yields exactly the specialisation a
GPU launch with those arguments would get (pointer dtypes, 16-byte alignment, ints equal to 1 or
divisible by 16, constexprs, num_warps). Each distinct specialisation is then compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
through TTIR, TTGIR, LLVM IR and PTX down to a cubin with Triton's bundled ptxas (3.9: CUDA 12.9's
for sm_80, CUDA 13.4's ``ptxas-blackwell`` for sm_90), whose ``-v`` log gives registers and spills. (CPU tensors come from a 64-byte aligned allocator, CUDA ones from a
512-byte aligned one, so alignment specialisations agree.)

The gate fails (exit 1) when a variant does not compile, when ptxas reports spill stores or loads,
when a driver crashes or a driver case launches nothing, when a kernel found in fishkern/ was not
launched for every target (kernels are found by reading the source: every ``@triton.jit``
function, or function passed to ``triton.jit(...)``, that no other jitted function calls), or when
this triton's internals differ from what the gate relies on (``JITFunction.run(*args, grid,
warmup, **kwargs)``, ``JITFunction._pack_args``, ``create_function_from_signature(sig, params,
backend)``, ``triton.knobs.nvidia.ptxas`` / ``dump_ptxas_log``; verified with triton 3.9.0).

    python3 scripts/triton_aot_gate.py [--targets 90 80] [--quick] [--json out.json] [--no-compile]

``--quick`` (a CI-sized run) keeps every kernel on every target, fp32 and bf16, the fp32
odd-stride Fisher shape (B=3, T=5, OUT=9, IN=100) that once spilled, the Fisher tile configs with
16- and 64-wide tiles (BLOCK_T 16 and 32, rows aligned or not, with and without sample splits, fp32)
and the split (workspace) path in fp32 and fp16. It leaves out, for the optimizers: fp16, AdamW
amsgrad without master weights and fp32 with amsgrad / free_dense_grads, maximize, int
hyperparameters, SGD without momentum or Nesterov, and the staggered-step / mixed-dtype runs
(``block_base`` equal to 1 or not divisible by 16); for the Fisher kernel: 32-wide tiles, the tile
sweep in bf16 / fp16, fp32 with lengths on the BERT shapes, int32 lengths, B = 1, T = 1, the
FFN-out, vocabulary-sized and sliced (unaligned) inputs; for the conv Fisher kernel it keeps two
ResNet-34 3x3 layers and a depthwise layer in fp32 and bf16, the tile sweep with 16- and 64-wide
output tiles in fp32 and the split path in fp32 and fp16, and leaves out the other ResNet-34 layers
(stem, 1x1, 8 and 4 px), the grouped, channels_last and sliced inputs, and fp16 outside the splits.
``--no-compile`` only drives the host code, binds and checks coverage (seconds, no ptxas).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERIFIED_TRITON = "3.9.0"


class GateError(Exception):
    """A problem the gate reports in one clear line (not a compile failure)."""


# ----------------------------------------------------------------------------------- discovery
def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute module of ``from <node.module> import ...`` written inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def discover_kernels(root: Path, package: str | None = None) -> tuple[set[str], dict[str, set[str]]]:
    """Read every .py file under ``root`` (a package directory) and return ``(kernels, calls)``:
    the ids ``module:function`` of jitted functions that no jitted function calls (the ones host
    code must launch), and for every jitted function the jitted functions it calls.

    Recognised: ``@triton.jit`` / ``@triton.jit(...)`` / ``@jit`` (imported from triton) on a
    function, and ``triton.jit(f)`` with ``f`` a module-level function. Any other use of
    ``triton.jit`` raises GateError, so a kernel cannot hide from the gate.
    """
    package = package or root.name
    jitted: dict[str, tuple[str, ast.FunctionDef]] = {}  # id -> (module, def)
    namespaces: dict[str, dict[str, str]] = {}  # module -> local name -> jitted id or "module:<mod>"
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        if "jit" not in source:  # no jitted function can be made without the name
            continue
        module = _module_name(path, root, package)
        tree = ast.parse(source, filename=str(path))
        triton_names, jit_names = set(), set()
        ns = namespaces.setdefault(module, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "triton":
                        triton_names.add(a.asname or "triton")
                    elif a.name.startswith(package + ".") and a.asname:
                        ns[a.asname] = "module:" + a.name
            elif isinstance(node, ast.ImportFrom):
                src = _resolve_from(module, path.name == "__init__.py", node)
                for a in node.names:
                    if src == "triton" and a.name == "jit":
                        jit_names.add(a.asname or "jit")
                    elif src.startswith(package):
                        # a jitted function or a submodule; resolved lazily below
                        ns[a.asname or a.name] = f"{src}:{a.name}"

        def is_jit(n: ast.AST) -> bool:
            return (isinstance(n, ast.Attribute) and n.attr == "jit" and isinstance(n.value, ast.Name)
                    and n.value.id in triton_names) or (isinstance(n, ast.Name) and n.id in jit_names)

        top_defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        accounted: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for d in node.decorator_list:
                    target = d.func if isinstance(d, ast.Call) else d
                    if is_jit(target):
                        accounted.add(id(target))
                        jitted[f"{module}:{node.name}"] = (module, node)
                        ns[node.name] = f"{module}:{node.name}"
            elif isinstance(node, ast.Call) and is_jit(node.func):
                arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
                if isinstance(arg, ast.Name) and arg.id in top_defs:
                    accounted.add(id(node.func))
                    jitted[f"{module}:{arg.id}"] = (module, top_defs[arg.id])
                    ns[arg.id] = f"{module}:{arg.id}"
        for node in ast.walk(tree):
            if is_jit(node) and id(node) not in accounted:
                raise GateError(f"{path}:{node.lineno}: a use of triton.jit the gate cannot follow; "
                                "decorate a function with @triton.jit or call triton.jit(function)")

    def resolve(module: str, expr: ast.AST) -> str | None:
        ns = namespaces.get(module, {})
        if isinstance(expr, ast.Name):
            ref = ns.get(expr.id)
        elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            mod = ns.get(expr.value.id, "")
            mod = mod[len("module:"):] if mod.startswith("module:") else mod.replace(":", ".")
            ref = f"{mod}:{expr.attr}"
        else:
            return None
        return ref if ref in jitted else None

    calls = {}
    for kid, (module, fn) in jitted.items():
        calls[kid] = {r for n in ast.walk(fn) if isinstance(n, ast.Call) and (r := resolve(module, n.func))} - {kid}
    called = set().union(*calls.values()) if calls else set()
    return set(jitted) - called, calls


# ----------------------------------------------------------------------------------- ptxas log
def parse_ptxas_log(log: str) -> dict:
    """Registers (the maximum over the functions in the log) and spill bytes (their sum) from a
    ``ptxas -v`` log."""
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    stores = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(m) for m in re.findall(r"(\d+) bytes spill loads", log)]
    if not regs:
        raise GateError(f"no 'Used N registers' line in the ptxas log:\n{log[-1000:]}")
    return {"regs": max(regs), "spill_stores": sum(stores), "spill_loads": sum(loads)}


# ----------------------------------------------------------------------------------- recording
@dataclass
class Variant:
    kernel: str  # module:function
    arch: int
    case: str  # the first driver case that launched it
    fn: object = field(repr=False)
    target: object = field(repr=False)
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    options: object = field(default=None, repr=False)
    cases: int = 1
    result: dict = field(default_factory=dict)

    def describe(self) -> str:
        names = self.fn.arg_names
        ce = ",".join(f"{names[k[0]]}={_plain(v)}" for k, v in sorted(self.constexprs.items()))
        divisible = {names[k[0]] for k, v in self.attrs.items() if ["tt.divisibility", 16] in v}
        not16 = [n for n, t in self.signature.items() if t != "constexpr" and n not in divisible
                 and (t.startswith("*") or t[0] in "iu")]
        return f"{ce} w={self.options.num_warps}" + (f" not16={','.join(not16)}" if not16 else "")


class Recorder:
    """Stands in for JITFunction.run: binds the launch for every target and records the variant."""

    def __init__(self, targets):
        import triton.runtime.jit as tjit
        from triton import knobs
        from triton.compiler import make_backend

        self.targets, self.knobs, self.tjit = targets, knobs, tjit
        self.backends = {t.arch: make_backend(t) for t in targets}
        self.binders: dict = {}
        self.variants: dict = {}
        self.launches: dict[str, int] = {}  # driver case -> launches
        self.launched: dict[str, set] = {}  # kernel id -> archs
        self.case = "?"

    def start_case(self, name: str) -> None:
        self.case = name
        self.launches[name] = 0

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        self.launches[self.case] = self.launches.get(self.case, 0) + 1
        kid = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
        # the options JITFunction.run adds from the knobs before binding
        kwargs["debug"] = kwargs.get("debug", fn.debug) or self.knobs.runtime.debug
        for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(self.knobs.compilation, opt):
                kwargs[opt] = getattr(self.knobs.compilation, opt)
        for target in self.targets:
            backend = self.backends[target.arch]
            key = (id(fn), target.arch)
            try:
                if key not in self.binders:
                    self.binders[key] = self.tjit.create_function_from_signature(fn.signature, fn.params, backend)
                bound, spec, opts = self.binders[key](*args, **kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            except Exception as e:  # noqa: BLE001 -- reported with both possible causes
                raise GateError(f"binding a launch of {kid} in case {self.case!r} failed ({type(e).__name__}: {e}): "
                                "the host code passes arguments the kernel does not take, or triton "
                                f"{_triton_version()} binds launches unlike {VERIFIED_TRITON}, which the gate "
                                "was verified with") from e
            vkey = (kid, target.arch, repr(signature), repr(sorted(constexprs.items(), key=str)),
                    repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if vkey in self.variants:
                self.variants[vkey].cases += 1
                continue
            self.launched.setdefault(kid, set()).add(target.arch)
            self.variants[vkey] = Variant(kid, target.arch, self.case, fn, target, signature,
                                          constexprs, attrs, options)
        return None


def _plain(v):
    return v if isinstance(v, (bool, int, float)) or v is None else str(v)


def _triton_version() -> str:
    import triton

    return getattr(triton, "__version__", "?")


def check_triton_internals() -> None:
    """Refuse, with a message, a triton whose internals the recorder and compiler calls differ from."""
    try:
        import triton
    except ImportError as e:
        raise GateError(f"triton is not importable ({e}); install it (pip install triton) to run the gate") from e
    problems = []
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        raise GateError(f"triton {_triton_version()}: {e} (gate verified with triton {VERIFIED_TRITON})") from e
    if list(inspect.signature(create_function_from_signature).parameters) != ["sig", "kparams", "backend"]:
        problems.append("create_function_from_signature(sig, kparams, backend)")
    pack = getattr(JITFunction, "_pack_args", None)
    if pack is None or list(inspect.signature(pack).parameters) != [
            "self", "backend", "kwargs", "bound_args", "specialization", "options"]:
        problems.append("JITFunction._pack_args(backend, kwargs, bound_args, specialization, options)")
    run_params = inspect.signature(JITFunction.run).parameters
    if not {"grid", "warmup"} <= set(run_params):
        problems.append("JITFunction.run(*args, grid, warmup, **kwargs)")
    nvidia = getattr(knobs, "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log") or not hasattr(nvidia, "ptxas"):
        problems.append("triton.knobs.nvidia.ptxas / dump_ptxas_log")
    if problems:
        raise GateError(f"triton {triton.__version__} lacks what the gate relies on: {'; '.join(problems)} "
                        f"(verified with triton {VERIFIED_TRITON})")


def ptxas_for(arch: int) -> str:
    """The ptxas Triton runs for this compute capability (3.9 bundles two: CUDA 12.9's ``ptxas``
    below sm_90, CUDA 13's ``ptxas-blackwell`` from sm_90 on)."""
    from triton import knobs

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(arch)
    except ImportError:
        tool = knobs.nvidia.ptxas
    path = tool.path
    if not path or not os.access(path, os.X_OK):
        raise GateError(f"triton's ptxas for sm_{arch} is missing or not executable: {path!r}")
    return f"{path} ({tool.version})"


def coverage_failures(kernels: set[str], calls: dict[str, set[str]], launched: dict[str, set[int]],
                      launches: dict[str, int], targets: list[int]) -> list[str]:
    """Kernels not launched on every target, launches of kernels discovery did not find, and
    driver cases that launched nothing (host code that silently took another path)."""
    out = [f"driver case {c!r} launched no Triton kernel" for c, n in launches.items() if n == 0]
    for kid in sorted(kernels):
        missing = sorted(set(targets) - launched.get(kid, set()))
        if missing:
            out.append(f"kernel {kid} was never launched for {', '.join(f'sm_{a}' for a in missing)}: "
                       "add a driver that reaches it through fishkern's host code")
    for kid in sorted(set(launched) - set(calls)):
        out.append(f"launched kernel {kid} was not found by discover_kernels: extend the discovery")
    return out


# ----------------------------------------------------------------------------------- drivers
def drive_optimizers(rec: Recorder, quick: bool) -> None:
    """fishkern.MaskedAdamW / MaskedSGD steps with implementation="triton" on CPU tensors (the
    usability check patched, nothing else): the optimizers' own tables, buffers and arguments."""
    import torch

    import fishkern
    from fishkern.ops import masked_step
    from fishkern.optim import _masked

    # where the optimizer and its step ops decide whether Triton can run on these tensors
    _masked.triton_usable_on = lambda device: True
    masked_step.triton_usable_on = lambda device: True

    def params(dtypes):
        gen = torch.Generator().manual_seed(0)
        shapes = [(64, 48), (48,), (5000,)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in zip(shapes, dtypes)]
        masks = [torch.randperm(p.numel(), generator=gen)[: max(1, p.numel() // 10)] for p in ps]
        return ps, masks

    def steps(opt, ps, *, backward, stagger):
        # stagger: parameter 0 gets no gradient on the first step, so runs start at block 1 (an int
        # the binder specialises as the constant 1) and, next step, split by step count
        for n in range(2):
            for i, p in enumerate(ps):
                if stagger and n == 0 and i == 0:
                    continue
                if backward:  # through autograd, so free_dense_grads' hooks gather the gradient
                    (p.float().square().sum() * 0.5).backward()
                else:
                    p.grad = torch.randn_like(p)
            opt.step()
            opt.zero_grad()

    def case(name, make, dtypes, backward=False, stagger=False):
        rec.start_case(name)
        ps, masks = params(dtypes)
        steps(make(ps, masks), ps, backward=backward, stagger=stagger)

    f32, bf16 = torch.float32, torch.bfloat16
    if quick:  # (dtype, amsgrad, master_weights, free_dense_grads)
        adamw = [(f32, 0, 0, 0), (bf16, 0, 0, 0), (bf16, 0, 0, 1), (bf16, 0, 1, 0), (bf16, 1, 1, 1)]
    else:
        adamw = [(dt, a, m, f) for dt in (f32, bf16, torch.float16) for a in (0, 1)
                 for m in ((0, 1) if dt != f32 else (0,)) for f in (0, 1)]
    for dt, amsgrad, master, free in adamw:
        case(f"adamw {str(dt)[6:]} amsgrad={amsgrad} master={master} free_dense_grads={free}",
             lambda ps, m: fishkern.MaskedAdamW(ps, m, lr=1e-3, amsgrad=bool(amsgrad), master_weights=bool(master),
                                                free_dense_grads=bool(free), implementation="triton"),
             [dt] * 3, backward=bool(free))
    for dt in [f32, bf16] if quick else [f32, bf16, torch.float16]:
        name = str(dt)[6:]
        momenta = [(0.9, True)] if quick else [(0.0, False), (0.9, False), (0.9, True)]
        for mom, nesterov in momenta:
            for master in [False, True] if dt != torch.float32 else [False]:
                case(f"sgd {name} momentum={mom} nesterov={int(nesterov)} master={int(master)}",
                     lambda ps, m: fishkern.MaskedSGD(ps, m, lr=0.1, momentum=mom, nesterov=nesterov,
                                                      weight_decay=5e-4, master_weights=master,
                                                      implementation="triton"), [dt] * 3)
        if quick:
            continue
        case(f"adamw {name} maximize weight_decay=0",
             lambda ps, m: fishkern.MaskedAdamW(ps, m, weight_decay=0.0, maximize=True, implementation="triton"),
             [dt] * 3)
        case(f"sgd {name} maximize dampening=0.1",
             lambda ps, m: fishkern.MaskedSGD(ps, m, lr=0.1, momentum=0.9, dampening=0.1, maximize=True,
                                              implementation="triton"), [dt] * 3)
    # capturable: step count (and a tensor lr) read on the device
    for dt in (f32, bf16):
        case(f"adamw {str(dt)[6:]} capturable lr tensor", lambda ps, m: fishkern.MaskedAdamW(
            ps, m, lr=torch.tensor(1e-3), capturable=True, implementation="triton"), [dt] * 3)
    case("adamw fp32 capturable float lr amsgrad", lambda ps, m: fishkern.MaskedAdamW(
        ps, m, amsgrad=True, capturable=True, implementation="triton"), [f32] * 3)
    case("sgd fp32 capturable lr tensor", lambda ps, m: fishkern.MaskedSGD(
        ps, m, lr=torch.tensor(0.1), momentum=0.9, capturable=True, implementation="triton"), [f32] * 3)
    if quick:
        return
    # ints where floats are documented (a user's weight_decay=0): the binder specialises them
    case("adamw fp32 int hyperparameters", lambda ps, m: fishkern.MaskedAdamW(
        ps, m, lr=1, eps=0, weight_decay=0, implementation="triton"), [torch.float32] * 3)
    case("sgd fp32 int hyperparameters", lambda ps, m: fishkern.MaskedSGD(
        ps, m, lr=1, momentum=1, dampening=0, weight_decay=0, implementation="triton"), [torch.float32] * 3)
    mixed = [torch.float32, torch.float32, torch.bfloat16]  # fp32 norms, bf16 weights: 2 runs, block_base=2
    for master in [0, 1]:
        case(f"adamw mixed fp32/bf16 staggered master={master}", lambda ps, m: fishkern.MaskedAdamW(
            ps, m, master_weights=bool(master), implementation="triton"), mixed, stagger=True)
        case(f"sgd mixed fp32/bf16 staggered master={master}", lambda ps, m: fishkern.MaskedSGD(
            ps, m, lr=0.1, momentum=0.9, master_weights=bool(master), implementation="triton"), mixed, stagger=True)


def drive_fisher(rec: Recorder, quick: bool) -> None:
    """The Fisher kernel through its launcher ``linear_fisher_triton_`` (the op's CUDA kernel:
    validation, tile choice, split choice, launch) and, for the split (workspace) path, through
    ``_launch`` with several splits, as on a GPU with idle SMs. A sweep of small odd shapes reaches
    every tile config (BLOCK_O, BLOCK_I in 16 / 32 / 64, BLOCK_T in 16 / 32, rows aligned or not)."""
    import torch

    from fishkern.ops import linear_fisher as lf
    from fishkern.ops import linear_fisher_triton as lft

    lf.triton_usable_on = lambda device: True

    def run(name, b, t, out_f, in_f, dtype, lengths_dtype=None, splits=1, sliced=False):
        lengths_name = str(lengths_dtype)[6:] if lengths_dtype is not None else "none"
        rec.start_case(f"fisher {str(dtype)[6:]} B={b} T={t} OUT={out_f} IN={in_f} lengths={lengths_name} "
                       f"splits={splits}" + (" sliced" if sliced else "") + (f" ({name})" if name else ""))
        pad = 3 if sliced else 0  # a view starting 3 elements in: pointers not 16-byte aligned
        x = torch.zeros(b, t, in_f + pad, dtype=dtype)[..., pad:]
        g = torch.zeros(b, t, out_f + pad, dtype=dtype)[..., pad:]
        acc = torch.zeros(out_f, in_f)
        lengths = None if lengths_dtype is None else torch.full((b,), t, dtype=lengths_dtype)
        if splits == 1:
            lf.linear_fisher_triton_(acc, x, g, lengths)
        else:
            lft._launch(acc, x, g, lengths, splits=splits)

    bert = (4, 128, 1024, 1024)  # BERT-large attention projection
    odd = (3, 5, 9, 100)  # strides not multiples of 16
    half = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    for dtype in [torch.float32, *half]:
        for shape in (bert, odd):
            for lengths_dtype in [None, torch.int64] + ([] if quick else [torch.int32]):
                if quick and lengths_dtype is not None and dtype == torch.float32:
                    continue
                for splits in [1] if quick else [1, 2]:
                    run("", *shape, dtype, lengths_dtype, splits)
        if quick:
            continue
        run("BERT FFN out", 2, 128, 1024, 4096, dtype, torch.int64)
        run("B=1", 1, 128, 1024, 1024, dtype)
        run("T=1", 8, 1, 768, 768, dtype)
        run("vocab", 2, 7, 30522, 383, dtype)
        run("", *odd, dtype, sliced=True)
    # Tile configs: OUT / IN of 16, 32, 64 (aligned rows) or 13, 29, 61 (odd rows), T = 13 / 37.
    blocks = [16, 64] if quick else [16, 32, 64]
    for dtype in [torch.float32] if quick else [torch.float32, *half]:
        for bo in blocks:
            for bi in blocks:
                for t in (13, 37):
                    for aligned in (True, False):
                        out_f, in_f = (bo, bi) if aligned else (bo - 3, bi - 3)
                        run("tiles", 3, t, out_f, in_f, dtype, torch.int64 if t == 13 else None)
                        run("tiles", 3, t, out_f, in_f, dtype, torch.int64, splits=3)
    for dtype in [torch.float32, torch.float16] if quick else [torch.float32, *half]:
        run("split", *bert, dtype, None, 2)
        run("split", *odd, dtype, torch.int64, 3)


def drive_conv_fisher(rec: Recorder, quick: bool) -> None:
    """The Conv2d Fisher kernel through its launcher ``conv2d_fisher_triton_`` (the op's CUDA kernel:
    validation, tile choice, split choice, launch) and through ``_launch`` with several splits. The
    shapes are ResNet-34's layers at batch 4 (stem 7x7/2, 3x3 at 32..4 px, strided 3x3, 1x1
    downsample), a depthwise and a grouped layer, channels_last and sliced (unaligned) inputs, and a
    sweep of small odd layers that reaches every tile config (BLOCK_O, BLOCK_I 16 / 32 / 64,
    BLOCK_T 16 / 32)."""
    import torch

    from fishkern.ops import conv_fisher as cf
    from fishkern.ops import conv_fisher_triton as cft

    cf.triton_usable_on = lambda device: True

    def run(name, b, cin, hw, cout, k, stride, padding, dtype, groups=1, splits=1, layout=""):
        rec.start_case(f"conv fisher {str(dtype)[6:]} B={b} Cin={cin} HW={hw} Cout={cout} k={k} s={stride} "
                       f"p={padding} groups={groups} splits={splits}" + (f" {layout}" if layout else "")
                       + (f" ({name})" if name else ""))
        pad = 3 if layout == "sliced" else 0  # a view 3 elements in: pointers not 16-byte aligned
        x = torch.zeros(b, cin, hw, hw + pad, dtype=dtype)[..., pad:]
        ho = (hw + 2 * padding - k) // stride + 1
        g = torch.zeros(b, cout, ho, ho + pad, dtype=dtype)[..., pad:]
        if layout == "channels_last":
            x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        acc = torch.zeros(cout, cin // groups, k, k)
        geo = ((stride, stride), (padding, padding), (1, 1), groups)
        if splits == 1:
            cf.conv2d_fisher_triton_(acc, x, g, *geo)
        else:
            cft._launch(acc, x, g, *geo, splits=splits)

    resnet = [("stem", 4, 3, 32, 64, 7, 2, 3), ("3x3 32px", 4, 64, 32, 64, 3, 1, 1),
              ("3x3/2", 4, 64, 32, 128, 3, 2, 1), ("1x1/2", 4, 64, 32, 128, 1, 2, 0),
              ("3x3 8px", 4, 256, 8, 256, 3, 1, 1), ("3x3 4px", 4, 512, 4, 512, 3, 1, 1)]
    half = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    for dtype in [torch.float32, *half]:
        for name, *shape in (resnet[1:3] if quick else resnet):
            run(name, *shape, dtype)
        run("depthwise", 4, 32, 8, 32, 3, 1, 1, dtype, groups=32)
        if quick:
            continue
        run("grouped", 4, 64, 8, 128, 3, 1, 1, dtype, groups=4)
        run("", *resnet[1][1:], dtype, layout="channels_last")
        run("", 3, 5, 9, 7, 3, 1, 1, dtype, layout="sliced")
    # tile configs: OUT per group 16 / 32 / 64 (or 3 less), Cin * 9 columns near 16 / 32 / 64,
    # 3x3 (9 positions, BLOCK_T 16) and 6x6 (36, BLOCK_T 32) outputs
    blocks = [16, 64] if quick else [16, 32, 64]
    for dtype in [torch.float32] if quick else [torch.float32, *half]:
        for bo in blocks:
            for cin in (2, 3, 7):  # 18, 27, 63 columns: BLOCK_I 32 / 32 / 64, and 16 for 1x1 below
                for hw in (3, 6):
                    run("tiles", 3, cin, hw, bo - 3, 3, 1, 1, dtype)
            run("tiles", 3, 16, 6, bo, 1, 1, 0, dtype)
    for dtype in [torch.float32, torch.float16] if quick else [torch.float32, *half]:
        run("split", 5, 3, 6, 7, 3, 1, 1, dtype, splits=3)
        run("split", *resnet[-1][1:], dtype, splits=2)


def drive_sampled_matmul(rec: Recorder, quick: bool) -> None:
    """Sparse backward's SDDMM kernel through the op's CUDA kernel (``_cuda_kernel``: transposed
    copies of the operands, then ``sampled_matmul_triton``), for BERT-large's Linear weight
    gradients (G [T, OUT], X [T, IN]) and an odd shape, int32 and int64 indices, fp32 / bf16 / fp16;
    and the kernel directly on row-major (untransposed) and sliced operands."""
    import torch

    from fishkern.ops import sampled_matmul as sm

    sm.triton_usable_on = lambda device: True

    def run(name, t, r, c, dtype, index_dtype=torch.int64, direct=False, sliced=False):
        rec.start_case(f"sampled_matmul {str(dtype)[6:]} T={t} R={r} C={c} index={str(index_dtype)[6:]}"
                       + (" direct" if direct else "") + (" sliced" if sliced else "") + (f" ({name})" if name else ""))
        pad = 3 if sliced else 0
        a = torch.zeros(t, r + pad, dtype=dtype)[:, pad:]
        b = torch.zeros(t, c + pad, dtype=dtype)[:, pad:]
        index = torch.arange(0, r * c, max(1, (r * c) // 97), dtype=index_dtype)
        if direct:
            sm.sampled_matmul_triton(a, b, index)
        else:
            sm._cuda_kernel(a, b, index)

    half = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    for dtype in [torch.float32, *half]:
        run("BERT-large attention", 1024, 1024, 1024, dtype)
        run("odd", 37, 9, 100, dtype, torch.int32)
        run("row-major", 13, 7, 5, dtype, direct=True)
        if not quick:
            run("BERT-large FFN out", 1024, 1024, 4096, dtype, torch.int32)
            run("T=1", 1, 768, 768, dtype)
            run("", 37, 9, 100, dtype, direct=True, sliced=True)


DRIVERS = {"optim": drive_optimizers, "fisher": drive_fisher, "conv_fisher": drive_conv_fisher,
           "sampled_matmul": drive_sampled_matmul}


# ----------------------------------------------------------------------------------- compile
def compile_variant(v: Variant) -> dict:
    from triton import knobs
    from triton.compiler import ASTSource, compile as triton_compile

    t0 = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: capture it
    try:
        with contextlib.redirect_stdout(log):
            k = triton_compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs), target=v.target,
                               options=v.options.__dict__)
        res = {"ok": True, **parse_ptxas_log(log.getvalue()), "shared_bytes": k.metadata.shared,
               "cubin_bytes": len(k.asm.get("cubin", b""))}
        if not res["cubin_bytes"]:
            res.update(ok=False, error="no cubin produced")
    except Exception as e:  # noqa: BLE001 -- any compile failure is a gate failure, reported
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000], "log": log.getvalue()[-3000:]}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    ap.add_argument("--quick", action="store_true", help="a CI-sized subset (see the module docstring)")
    ap.add_argument("--json", help="write every variant and its result here")
    ap.add_argument("--no-compile", action="store_true", help="drive, bind and check coverage only")
    args = ap.parse_args(argv)

    # Real JITFunctions (not the interpreter) and a fresh cache, so every variant runs ptxas here.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))  # the fishkern of this checkout, the one discovery reads
    cache = tempfile.mkdtemp(prefix="fishkern_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache
    failures: list[str] = []
    variants: list[Variant] = []
    t_start = time.perf_counter()
    try:
        kernels, calls = discover_kernels(REPO / "fishkern")
        check_triton_internals()
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import JITFunction

        ptxas = {a: ptxas_for(a) for a in args.targets}
        print(f"triton {triton.__version__}, {'quick' if args.quick else 'full'}; "
              f"kernels: {', '.join(sorted(k.split(':')[1] for k in kernels))}", flush=True)
        for a, p in ptxas.items():
            print(f"sm_{a}: ptxas {p}", flush=True)
        rec = Recorder([GPUTarget("cuda", a, 32) for a in args.targets])
        JITFunction.run = lambda self, *a, grid, warmup, **kw: rec(self, *a, grid=grid, warmup=warmup, **kw)
        for name, driver in DRIVERS.items():
            try:
                driver(rec, args.quick)
            except GateError:
                raise
            except Exception:  # noqa: BLE001 -- host code crashed: a gate failure, with its traceback
                failures.append(f"driver {name} crashed in case {rec.case!r}:\n{traceback.format_exc()}")
        failures += coverage_failures(kernels, calls, rec.launched, rec.launches, args.targets)
        variants = list(rec.variants.values())
        print(f"{len(variants)} variants from {sum(rec.launches.values())} launches in {len(rec.launches)} cases",
              flush=True)
        if not args.no_compile:
            for n, v in enumerate(variants, 1):
                v.result = r = compile_variant(v)
                status = "ok  " if r["ok"] and not (r["spill_stores"] or r["spill_loads"]) else "FAIL"
                stats = (f"regs {r['regs']:3d} spills {r['spill_stores']}/{r['spill_loads']} smem {r['shared_bytes']}"
                         if r["ok"] else r["error"].splitlines()[0][:160])
                print(f"[{n:3d}/{len(variants)}] {status} sm_{v.arch} {v.kernel.split(':')[1]:<22} {r['seconds']:5.1f}s "
                      f"{stats} | {v.case} | {v.describe()}", flush=True)
                if not r["ok"]:
                    failures.append(f"sm_{v.arch} {v.kernel} ({v.case}; {v.describe()}) failed to compile:\n{r['error']}")
                elif r["spill_stores"] or r["spill_loads"]:
                    failures.append(f"sm_{v.arch} {v.kernel} ({v.case}; {v.describe()}) spills registers: "
                                    f"{r['regs']} registers, {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    except GateError as e:
        failures.append(str(e))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    if args.json:
        rows = [{"kernel": v.kernel, "arch": v.arch, "case": v.case, "cases": v.cases, "signature": v.signature,
                 "constexprs": {v.fn.arg_names[k[0]]: _plain(c) for k, c in v.constexprs.items()},
                 "num_warps": v.options.num_warps, "num_stages": v.options.num_stages, **v.result}
                for v in variants]
        Path(args.json).write_text(json.dumps({"variants": rows, "failures": failures, "seconds": round(seconds, 1),
                                               "quick": args.quick, "targets": args.targets}, indent=1))
    for kernel, arch in sorted({(v.kernel, v.arch) for v in variants if v.result.get("ok")}):
        done = [v.result for v in variants if (v.kernel, v.arch) == (kernel, arch) and v.result.get("ok")]
        print(f"summary: sm_{arch} {kernel.split(':')[1]:<22} {len(done):3d} variants, max {max(r['regs'] for r in done)} "
              f"registers, {sum(1 for r in done if r['spill_stores'] or r['spill_loads'])} spilling", flush=True)
    for f in failures:
        print(f"FAIL: {f}", flush=True)
    compiled = sum(1 for v in variants if v.result)
    print(f"triton_aot_gate: {'FAIL' if failures else 'ok'}: {len(variants)} variants, {compiled} compiled, "
          f"{len(failures)} failures, {seconds:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
