"""distill: knowledge distillation and structured pruning of vision students, on PyTorch Lightning."""

from distill.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, ImageFolderDataModule
from distill.ema import EMA
from distill.losses import DISTLoss, DKDLoss, KDLoss, LogitStandardKDLoss
from distill.module import DistillModule
from distill.predictions import PredictionWriter

__all__ = [
    "EMA",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DISTLoss",
    "DKDLoss",
    "DistillModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "KDLoss",
    "LogitStandardKDLoss",
    "PredictionWriter",
]
__version__ = "0.1.0"
