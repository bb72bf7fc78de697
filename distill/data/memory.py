"""Datasets held in memory as one uint8 tensor, transformed a whole batch at a time.

Small datasets (Fashion-MNIST, CIFAR) fit in memory many times over. Gathering a batch by indexing
one tensor, then cropping, flipping and normalising it with tensor ops, avoids per-sample Python
and PIL. On a GPU the splits can live in device memory (:class:`DeviceBatches`): each batch is then
one gather and a few elementwise kernels, with no host-to-device copy and no DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distill.data.base import SplitDataModule
from distill.data.batch import Batch, collate_batch

__all__ = [
    "BatchTransform",
    "DeviceBatches",
    "InMemoryDataModule",
    "TensorImageDataset",
    "random_crop",
    "random_hflip",
]


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample random crop of a zero-padded (N, C, H, W) batch back to (H, W)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    off_y = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    off_x = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    rows = (off_y + torch.arange(h, device=images.device))[:, :, None]  # (N, H, 1)
    cols = (off_x + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Flip each image of a (N, C, H, W) batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(
    images: torch.Tensor, probability: float, area: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3
) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020) of a normalised (N, C, H, W) batch, vectorised.

    With ``probability``, each image gets one rectangle of ``area`` (a fraction of the image, uniform) and
    aspect ratio log-uniform in [``min_aspect``, 1 / ``min_aspect``] filled with standard normal noise: timm's
    ``RandomErasing(mode="pixel")`` and its defaults (the paper's largest area is 0.4). A rectangle larger
    than the image is cut to it rather than drawn again (timm loops over the images of a batch in Python;
    this is one set of tensor ops).
    """
    n, _, h, w = images.shape
    device = images.device
    size = torch.empty(n, device=device).uniform_(*area) * (h * w)
    aspect = torch.empty(n, device=device).uniform_(math.log(min_aspect), -math.log(min_aspect)).exp()
    eh = (size * aspect).sqrt().round().clamp(1, h)
    ew = (size / aspect).sqrt().round().clamp(1, w)
    top = (torch.rand(n, device=device) * (h - eh + 1)).floor()
    left = (torch.rand(n, device=device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    erased = in_rows[:, :, None] & in_cols[:, None, :] & (torch.rand(n, device=device) < probability)[:, None, None]
    return torch.where(erased[:, None], torch.randn_like(images), images)


class BatchTransform:
    """uint8 (N, C, H, W) batch -> normalised float batch, optionally augmented and resized.

    Args:
        mean: per-channel mean of the [0, 1] pixels.
        std: per-channel standard deviation.
        augment: random crop with ``padding`` and (if ``flip``) a random horizontal flip.
        padding: zero padding of the random crop.
        flip: allow horizontal flips (off for data where left/right matters).
        resize: resize to ``resize`` x ``resize`` (bilinear, antialiased when it shrinks, as PIL and timm's
            evaluation transform resize) after augmentation.
        erasing: probability of :func:`random_erase` on each image, after normalising and resizing.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        resize: int | None = None,
        erasing: float = 0.0,
    ) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment
        self.padding = padding
        self.flip = flip
        self.resize = resize
        self.erasing = erasing

    @property
    def is_random(self) -> bool:
        """Whether a batch comes out differently each time (its teacher logits cannot be cached)."""
        return self.augment or self.erasing > 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            if self.padding > 0:
                images = random_crop(images, self.padding)
            if self.flip:
                images = random_hflip(images)
        if self.mean.device != images.device:  # moved once, not per batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = images.float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=True)
        if self.erasing > 0:
            x = random_erase(x, self.erasing)
        return x


class TensorImageDataset(Dataset):
    """Images as one uint8 (N, C, H, W) tensor and labels as one int64 tensor.

    ``__getitems__`` serves a whole :class:`~distill.data.batch.Batch` with one indexing op; use
    :func:`~distill.data.batch.collate_batch` as the DataLoader's ``collate_fn``. Its ``teacher_logits``
    are those set by :class:`distill.cache.TeacherLogitCache`, else ``None``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform
        self.teacher_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """Move the images, labels and any cached teacher logits to ``device`` (in place)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        if self.teacher_logits is not None:
            self.teacher_logits = self.teacher_logits.to(device)
        return self

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        x, y = self.transform(self.images[index]), self.labels[index]
        return Batch(x, y, None if self.teacher_logits is None else self.teacher_logits[index])

    def __getitem__(self, index: int) -> Batch:
        return Batch(*(None if t is None else t[0] for t in self.__getitems__([index])))


class DeviceBatches:
    """Batches of a :class:`TensorImageDataset` that lives on the device: a drop-in for its DataLoader.

    Each epoch draws from torch's global generator exactly as a DataLoader does (its workers' base
    seed, then ``RandomSampler``'s seed for one ``randperm`` on the CPU), so with augmentation off it
    yields the same batches in the same order as the DataLoader path and leaves the generator in the
    same state. Each batch is one index op on the device plus the batched transform. Under DDP each
    process takes every ``world_size``-th index of the permutation (padded to equal length, as
    ``DistributedSampler`` does).
    """

    def __init__(
        self, dataset: TensorImageDataset, batch_size: int, shuffle: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    def _num_samples(self) -> int:
        return -(-len(self.dataset) // self.world_size)

    def __len__(self) -> int:
        return -(-self._num_samples() // self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.dataset)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, unused here
        if self.shuffle:  # the same draws as torch.utils.data.RandomSampler
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self._num_samples() * self.world_size
            order = torch.cat([order, order[: total - n]])[self.rank :: self.world_size]
        return order.to(self.dataset.device)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield self.dataset.__getitems__(order[start : start + self.batch_size])


class InMemoryDataModule(SplitDataModule):
    """Base for datamodules whose splits load into memory as uint8 tensors.

    Subclasses set ``num_classes``, ``in_chans``, ``native_size``, ``mean``, ``std``, ``crop_padding``,
    ``hflip`` and implement :meth:`load_split`. A validation split of ``val_size`` images comes out of
    the training set, with a fixed seed so that every run and every sweep trial sees the same split;
    the test set is only for final numbers.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: validation images taken from the training set: a count, or a fraction in (0, 1).
        augment: random crop (with padding) and horizontal flip on the training split.
        random_erasing: probability of random erasing (Zhong et al., AAAI 2020) of each training image,
            on the batch, where it is built (:func:`random_erase`); 0 turns it off.
        resize: resize images to ``resize`` x ``resize`` (e.g. 224 for ImageNet-sized teachers).
        num_workers: DataLoader worker processes (batches are built with tensor ops; 0 is usually fastest).
        split_seed: seed of the train/validation split.
        on_device: keep the splits in the training device's memory and build batches there
            (:class:`DeviceBatches`, also on the CPU). ``None`` (default): yes when training on a GPU and
            the splits take less than a quarter of its free memory, decided at setup; ``False``: CPU
            memory and DataLoaders.
    """

    num_classes: int
    in_chans: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    hflip: bool = True
    crop_pct = 1.0  # evaluated whole, resized (bilinear) to ``resize``
    interpolation = "bilinear"

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        val_size: int | float = 5000,
        augment: bool = False,
        random_erasing: float = 0.0,
        resize: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        on_device: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, split_seed)
        if resize is not None and resize < 1:
            raise ValueError(f"resize must be a positive size in pixels, got {resize}")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        self.augment, self.resize, self.on_device = augment, resize, on_device
        self.random_erasing = random_erasing
        self.device = torch.device("cpu")  # where the splits are; set at setup
        self.batches_on_device = False  # DeviceBatches rather than DataLoaders; set at setup
        self.train_set: TensorImageDataset | None = None
        self.val_set: TensorImageDataset | None = None
        self.test_set: TensorImageDataset | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the model sees."""
        size = self.resize or self.native_size
        return size, size

    def batch_settings(self) -> dict[str, Any]:
        return super().batch_settings() | {
            "augment": self.augment,
            "random_erasing": self.random_erasing,
            "resize": self.input_size[0],
        }  # fmt: skip  (the size the model sees: a resize to the native size makes the same batches)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,) of the training or the test split."""
        raise NotImplementedError

    def transform(self, train: bool) -> BatchTransform:
        return BatchTransform(
            self.mean,
            self.std,
            augment=train and self.augment,
            padding=self.crop_padding,
            flip=self.hflip,
            resize=self.resize,
            erasing=self.random_erasing if train else 0.0,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self.load_split(train=True)
            train_idx, val_idx = self.split_indices(len(labels))
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], self.transform(train=True))
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], self.transform(train=False))
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TensorImageDataset(*self.load_split(train=False), self.transform(train=False))
        self.device = self._target_device()
        self.batches_on_device = self.device.type != "cpu" or bool(self.on_device)
        for dataset in (self.train_set, self.val_set, self.test_set):
            if dataset is not None:
                dataset.to(self.device)

    def _target_device(self) -> torch.device:
        """Where the splits go: the trainer's device when ``on_device`` says so, else the CPU."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        on_device = self.on_device
        if on_device is None:
            on_device = False
            if device.type == "cuda":
                size = sum(d.images.nbytes for d in (self.train_set, self.val_set, self.test_set) if d is not None)
                on_device = size < torch.cuda.mem_get_info(device)[0] / 4
        return device if on_device else torch.device("cpu")

    def loader_options(self) -> dict[str, Any]:
        return {"collate_fn": collate_batch}

    def _loader(self, dataset: TensorImageDataset | None, train: bool, split: str) -> Iterable[Batch]:
        if dataset is None or not self.batches_on_device:
            return super()._loader(dataset, train, split)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        size = self.batch_size if train else self.eval_batch_size
        return DeviceBatches(dataset, size, shuffle=train, rank=rank, world_size=world)
