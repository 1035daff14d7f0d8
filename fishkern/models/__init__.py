"""Models of the fishkern recipes: CIFAR-style ResNets (the paper's ResNet-34 and small variants)."""
from .resnet import RESNET34_CIFAR10_PARAMS, BasicBlock, CifarResNet, cifar_resnet, resnet34_cifar

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet34_cifar", "RESNET34_CIFAR10_PARAMS"]
