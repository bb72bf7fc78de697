"""distill: knowledge distillation and structured pruning of vision students, on PyTorch Lightning."""

from distill.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, ImageFolderDataModule
from distill.losses import KDLoss
from distill.module import DistillModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DistillModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "KDLoss",
]
__version__ = "0.1.0"
