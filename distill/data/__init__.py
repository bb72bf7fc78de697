"""Datamodules: Fashion-MNIST (the embedded default), CIFAR-10/100 and image folders.

Every datamodule exposes ``num_classes``, ``in_chans`` and ``input_size`` before ``setup``, so the
CLI can link them into the student, and its loaders yield :class:`Batch` objects.
"""

from distill.data.base import SplitDataModule
from distill.data.batch import Batch, as_batch
from distill.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from distill.data.fashion_mnist import FashionMNISTDataModule, read_idx
from distill.data.folder import ImageFolderDataModule
from distill.data.locate import LocatedDataModule, locate_dataset
from distill.data.memory import (
    BatchTransform,
    DeviceBatches,
    InMemoryDataModule,
    TensorImageDataset,
    random_crop,
    random_erase,
    random_hflip,
)

__all__ = [
    "Batch",
    "BatchTransform",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceBatches",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "LocatedDataModule",
    "SplitDataModule",
    "TensorImageDataset",
    "as_batch",
    "locate_dataset",
    "random_crop",
    "random_erase",
    "random_hflip",
    "read_idx",
]
