"""ResNets for small images (CIFAR-10's 32×32, or smaller): the paper's ResNet-34 and small variants.

The architecture of the paper's CIFAR-10 code (a ResNet-34 with the 3×3 stem used for 32×32
inputs): a 3×3 stride-1 convolution stem without max-pool, four stages of BasicBlocks (two 3×3
convolutions with BatchNorm; the first block of stages 2–4 halves the resolution with stride 2 and
a 1×1 convolution + BatchNorm projection on the shortcut), global average pooling and one linear
head named ``fc`` (the head a FISH mask forces in). ``resnet34_cifar()`` has blocks (3, 4, 6, 3)
and widths (64, 128, 256, 512): 21,282,122 parameters with 10 classes.

Every module that owns parameters is called exactly once per forward, so the batched Fisher
estimator (``fishkern.fisher``) treats the model exactly (Conv2d, BatchNorm-in-eval and Linear rules).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet34_cifar", "RESNET34_CIFAR10_PARAMS"]

RESNET34_CIFAR10_PARAMS = 21_282_122


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut = identity, or a strided 1×1
    convolution + BatchNorm when the resolution or the width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3×3 stem (stride 1, no max-pool) → stages of BasicBlocks → global average pool → ``fc``.

    blocks: BasicBlocks per stage; widths: channels per stage (same length); the first stage keeps
    the resolution, every later one halves it. in_channels: 3 for RGB, 1 for grey images.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        blocks, widths = tuple(int(b) for b in blocks), tuple(int(w) for w in widths)
        if not blocks or len(blocks) != len(widths):
            raise ValueError(f"blocks and widths need the same (non-zero) length, got {blocks} and {widths}")
        if min(blocks) < 1 or min(widths) < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"blocks, widths, num_classes and in_channels must be >= 1 (got {blocks}, {widths}, "
                             f"{num_classes}, {in_channels})")
        self.blocks, self.widths, self.num_classes, self.in_channels = blocks, widths, num_classes, in_channels
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, planes = [], widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            for b in range(n):
                layers.append(BasicBlock(planes, w, 2 if stage > 0 and b == 0 else 1))
                planes = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"CifarResNet(blocks={list(self.blocks)}, widths={list(self.widths)}, in_channels={self.in_channels}, "
                f"classes={self.num_classes}; {n:,} parameters)")


def cifar_resnet(
    blocks: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
    num_classes: int = 10,
    in_channels: int = 3,
) -> CifarResNet:
    """A configurable CIFAR-style ResNet (default: one block per stage, widths 16–128, 0.31M
    parameters) — the small models of the offline miniature and of tests."""
    return CifarResNet(blocks, widths, num_classes, in_channels)


def resnet34_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The paper's ResNet-34 for 32×32 inputs (21,282,122 parameters with 10 classes)."""
    return CifarResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, in_channels)
