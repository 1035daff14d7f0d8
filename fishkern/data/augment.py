"""Batched, seeded image augmentation on tensors: random crop, horizontal flip, cutout.

The CIFAR-10 recipe of the paper's code (based on cifar10-fast): pad 4 pixels (reflect), take a
random 32×32 crop, flip left-right with probability 1/2, and cut out one random 8×8 square (set to
0, i.e. to the mean once images are normalised). Everything works on a whole batch ``(N, C, H, W)``
at once on the batch's device (index arithmetic, no per-image Python loop); the random draws come
from a ``torch.Generator`` on the CPU (N small integers per transform), so the same generator seed
gives the same augmented batch on every device.

The explicit forms (``crop``, ``flip``, ``cutout``) take the per-image offsets / choices, for
tests and for callers that draw their own; ``Augment`` draws them and applies all three.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "crop", "flip", "cutout", "pad"]

PAD_MODES = ("reflect", "zeros", "replicate")


def _check_batch(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{what}: expected a batch of images (N, C, H, W), got {getattr(x, 'shape', type(x))}")


def _per_image(v: Tensor, n: int, what: str, device) -> Tensor:
    v = torch.as_tensor(v).to(device=device, dtype=torch.int64).reshape(-1)
    if v.numel() != n:
        raise ValueError(f"{what}: {v.numel()} values for a batch of {n} images")
    return v


def pad(x: Tensor, padding: int, mode: str = "reflect") -> Tensor:
    """Pad the two spatial dimensions by ``padding`` on every side (``reflect``, ``zeros`` or
    ``replicate``)."""
    _check_batch(x, "pad")
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    if padding == 0:
        return x
    if mode == "zeros":
        return F.pad(x, (padding,) * 4)
    if mode == "reflect" and padding >= min(x.shape[-2:]):
        raise ValueError(f"reflect padding {padding} needs images larger than that, got {tuple(x.shape[-2:])}")
    return F.pad(x, (padding,) * 4, mode=mode)


def crop(x: Tensor, top: Tensor, left: Tensor, size: tuple[int, int]) -> Tensor:
    """``out[n] = x[n, :, top[n]:top[n]+h, left[n]:left[n]+w]`` for every image n, in one gather.
    Offsets must keep the window inside the image."""
    _check_batch(x, "crop")
    n, c, hp, wp = x.shape
    h, w = size
    top, left = _per_image(top, n, "crop top", x.device), _per_image(left, n, "crop left", x.device)
    if n and (int(top.min()) < 0 or int(left.min()) < 0 or int(top.max()) + h > hp or int(left.max()) + w > wp):
        raise ValueError(f"crop: a {h}x{w} window at the given offsets leaves the {hp}x{wp} image")
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, h)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, w)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, hp * wp).gather(2, flat).reshape(n, c, h, w)


def flip(x: Tensor, which: Tensor) -> Tensor:
    """Mirror left-right the images where ``which`` (bool, one per image) is True."""
    _check_batch(x, "flip")
    which = torch.as_tensor(which).to(device=x.device, dtype=torch.bool).reshape(-1)
    if which.numel() != x.shape[0]:
        raise ValueError(f"flip: {which.numel()} choices for a batch of {x.shape[0]} images")
    return torch.where(which[:, None, None, None], x.flip(-1), x)


def cutout(x: Tensor, top: Tensor, left: Tensor, size: int, value: float = 0.0) -> Tensor:
    """Set the ``size``×``size`` square at (top[n], left[n]) of every image n (all channels) to
    ``value``; a square reaching past the border is cut there. Returns a new tensor."""
    _check_batch(x, "cutout")
    n, _, h, w = x.shape
    top, left = _per_image(top, n, "cutout top", x.device), _per_image(left, n, "cutout left", x.device)
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size)  # (N, H)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size)  # (N, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return x.masked_fill(hole[:, None], value)


@dataclass(frozen=True)
class Augment:
    """Random crop (after padding) → random horizontal flip → cutout, on a batch.

    crop_padding: pixels of padding before the random crop back to the input size (0: no crop).
    pad_mode: "reflect" (cifar10-fast's), "zeros" or "replicate".
    flip: flip left-right with probability 1/2 (turn off for digits and text).
    cutout_size: side of the square set to 0 (0: no cutout); its top-left corner is uniform over
        the positions that keep it inside the image (cifar10-fast's rule).

    ``aug(x, generator)`` draws, from the CPU ``generator``, for each image in this order: crop
    offsets (top, left), flip choices, cutout corners (top, left), and returns a new batch on
    ``x``'s device. Cost: one gather and two elementwise passes over the batch.
    """

    crop_padding: int = 4
    pad_mode: str = "reflect"
    flip: bool = True
    cutout_size: int = 8

    def __post_init__(self):
        if self.crop_padding < 0 or self.cutout_size < 0:
            raise ValueError("crop_padding and cutout_size must be >= 0")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "Augment")
        n, _, h, w = x.shape
        if self.cutout_size > min(h, w):
            raise ValueError(f"cutout size {self.cutout_size} is larger than the {h}x{w} images")

        def draw(high: int) -> Tensor:
            return torch.randint(0, high, (n,), generator=generator).to(x.device)

        if self.crop_padding:
            p = self.crop_padding
            x = crop(pad(x, p, self.pad_mode), draw(2 * p + 1), draw(2 * p + 1), (h, w))
        if self.flip:
            x = flip(x, torch.rand(n, generator=generator).lt(0.5).to(x.device))
        if self.cutout_size:
            s = self.cutout_size
            x = cutout(x, draw(h - s + 1), draw(w - s + 1), s)
        return x
