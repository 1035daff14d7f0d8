"""The command-line jobs: `fishkern demo` (offline MiniLM/VADER), `fishkern glue` (the paper's GLUE
recipe) and `fishkern cifar` (the paper's ResNet/CIFAR-10 recipe).

This package imports nothing heavy: the command line reads its defaults from here and from the
runners' config dataclasses before torch is imported.
"""
from __future__ import annotations

__all__ = ["PAPER_MODEL", "DeviceUnavailable", "check_device"]

PAPER_MODEL = "bert-large-cased-whole-word-masking"  # the GLUE runner's default (the paper's model)


class DeviceUnavailable(ValueError):
    """A ``--device`` this machine or this torch build cannot provide."""


def _torch_summary(torch) -> str:
    cuda = torch.version.cuda
    built = f"built with CUDA {cuda}" if cuda else "built without CUDA"
    if getattr(torch.version, "hip", None):
        built = f"built with ROCm {torch.version.hip}"
    n = torch.cuda.device_count()  # 0 on a CPU build, without initialising CUDA
    return f"torch {torch.__version__}, {built}, {n} GPU{'' if n == 1 else 's'} visible"


def check_device(name: str | None) -> str | None:
    """Refuse a device that is not there, before any work: ``DeviceUnavailable`` with one line
    saying what is (torch version, CUDA build or not, visible GPUs). ``None`` (the runners' "cuda
    when available") passes. Returns the name unchanged."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailable(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            gpu_build = torch.version.cuda or getattr(torch.version, "hip", None)
            hint = "check the driver and CUDA_VISIBLE_DEVICES" if gpu_build else "install a CUDA build of torch"
            raise DeviceUnavailable(f"--device {name}: no CUDA GPU here ({_torch_summary(torch)}); "
                                    f"use --device cpu or {hint}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise DeviceUnavailable(f"--device {name}: there is no GPU {dev.index} ({_torch_summary(torch)}: {have})")
        return name
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceUnavailable(f"--device {name}: no {dev.type} device here ({_torch_summary(torch)}); "
                                f"use --device cpu")
    return name


def __getattr__(name: str):
    # `fishkern.runners.cifar` etc. after a plain `import fishkern`, imported on first use
    if name in ("demo", "glue", "cifar"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fishkern.runners' has no attribute {name!r}")
