"""The model, optimizer and mask of a `fishkern cifar` run (a CIFAR ResNet, Nesterov SGD / MaskedSGD,
a FISH or random mask with the ``fc`` head forced in)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import HEAD, CifarConfig

if TYPE_CHECKING:
    import torch

    from ...models.resnet import CifarResNet


def build_model(cfg: CifarConfig, data_or_shape, seed: int) -> CifarResNet:
    import torch

    from ...models.resnet import CifarResNet

    channels, classes = (data_or_shape["x_train"].shape[1], data_or_shape["num_classes"]) \
        if isinstance(data_or_shape, dict) else data_or_shape
    torch.manual_seed(seed)
    return CifarResNet(cfg.model_blocks(), cfg.model_widths(), classes, channels)


def check_budget(cfg: CifarConfig, model: torch.nn.Module) -> None:
    """Refuse densities whose k cannot hold the forced head (before any process starts)."""
    if not cfg.force_head or not any(m in ("fish", "random") for m in cfg.methods):
        return
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(HEAD + "."))
    for d in cfg.densities:
        if math.floor(d * total) < head:
            raise ValueError(f"density {d:g} gives k = {math.floor(d * total):,} entries of {total:,}, fewer than the "
                             f"{head:,} of the forced head '{HEAD}'; raise the density or pass --no-force-head")


def make_optimizer(cfg: CifarConfig, model: torch.nn.Module, mask=None) -> torch.optim.Optimizer:
    """Nesterov SGD of the recipe: ``torch.optim.SGD`` on every parameter without a mask,
    ``MaskedSGD`` (momentum and weight decay on the k masked entries only) with one. lr is set per step."""
    import torch

    nesterov = cfg.nesterov and cfg.momentum > 0
    if mask is None:
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, nesterov=nesterov,
                               weight_decay=cfg.weight_decay)
    from ...optim import MaskedSGD

    return MaskedSGD(model.named_parameters(), mask, lr=0.0, momentum=cfg.momentum, nesterov=nesterov,
                     weight_decay=cfg.weight_decay)


def make_mask(cfg: CifarConfig, model, method: str, density: float, data, num_samples: int, *, seed: int,
              provenance=None):
    """The mask of a masked method through the one switch (``fishkern.fisher.mask.make_mask``): the
    ``fc`` head forced in unless ``cfg.force_head`` is off; FISH from ``num_samples`` samples of
    ``data`` (``seed``: the estimate's; no progress bar), random drawn with ``seed``."""
    from ...fisher.mask import make_mask as switch

    force = HEAD if cfg.force_head else ()
    return switch(model, method, density, data=data, num_samples=num_samples, force=force, seed=seed,
                  provenance=provenance, **({"progress": False} if method == "fish" else {}))[0]
