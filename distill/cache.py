"""Teacher logits computed once and served with the batches, instead of a teacher forward per step.

Every training step of KD pays for a teacher forward. When a split's inputs are deterministic (no
random augmentation), the teacher's logits for it never change: compute them once, keep them beside
the images, and hand them out with each batch (as its ``Batch.teacher_logits``, see
:mod:`distill.data.batch`). A sweep over temperatures reuses the same file for every trial and
epoch. With augmentation on, the training split changes every epoch, so its logits are computed
live; validation and test splits are cached all the same.

The cache is keyed by a hash of the teacher (its weights and settings) and of the split (its
images and transform): a different teacher checkpoint or data gives another key, so a stale cache
is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from distill.data.memory import TensorImageDataset
from distill.rundir import atomic_path, file_lock
from students.checkpoint import read_checkpoint
from teachers import weights_digest

__all__ = ["TeacherLogitCache", "compute_logits", "split_fingerprint"]

_SPLITS = {"train": "train_set", "val": "val_set", "test": "test_set"}


def split_fingerprint(dataset: TensorImageDataset) -> str:
    """SHA-256 of a split's images and of its (deterministic) transform."""
    t = dataset.transform
    settings = (t.mean.tolist(), t.std.tolist(), t.resize, tuple(dataset.images.shape))
    if t.resize is not None and t.resize < max(dataset.images.shape[-2:]):  # shrunk with antialiasing since
        settings += ("antialiased",)  # 2026-12-07: logits cached before are of other images
    digest = hashlib.sha256(repr(settings).encode())
    digest.update(dataset.images.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_logits(
    teacher: nn.Module, dataset: TensorImageDataset, device: torch.device, batch_size: int = 1024, context=None
) -> torch.Tensor:
    """The teacher's logits for every image of ``dataset``, in order, as float32 on the CPU."""
    outputs = []
    for start in range(0, len(dataset), batch_size):
        x = dataset.transform(dataset.images[start : start + batch_size]).to(device)
        with context() if context is not None else contextlib.nullcontext():
            outputs.append(teacher(x).float().cpu())
    return torch.cat(outputs)


class TeacherLogitCache(Callback):
    """Serve cached teacher logits with the batches of the in-memory datamodules.

    ``DistillModule`` uses the logits that come with a batch (``Batch.teacher_logits``, set here through
    ``TensorImageDataset.teacher_logits``) instead of running the teacher. Splits
    with random augmentation (the training split of a datamodule with ``augment=True`` or
    ``random_erasing``, or of a ``DistillModule`` with ``mixup``) keep the live teacher. Datasets that are
    not in memory (``ImageFolderDataModule``) are left alone.

    Args:
        cache_dir: folder for the cache files (``<key>.pt``), shared by runs, trials and processes;
            ``None`` keeps the logits in memory for this run only.
        batch_size: images per teacher forward while filling the cache.
    """

    def __init__(self, cache_dir: str | None = None, batch_size: int = 1024) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise ValueError(f"TeacherLogitCache: cache_dir {cache_dir!r} is a file, not a folder")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.batch_size = batch_size
        self.hits: list[str] = []  # splits served from a cache file, for logs and tests

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module, ("train", "val"))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module, ("val",))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module, ("test",))

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, splits: tuple[str, ...]) -> None:
        teacher = getattr(pl_module, "teacher", None)
        datamodule = trainer.datamodule
        if teacher is None or datamodule is None:
            return
        teacher_key = None
        for split in splits:
            dataset = getattr(datamodule, _SPLITS[split], None)
            if not isinstance(dataset, TensorImageDataset) or dataset.teacher_logits is not None:
                continue
            if dataset.transform.is_random:
                rank_zero_info(f"TeacherLogitCache: the {split} split is augmented, its teacher logits stay live")
                continue
            if split == "train" and getattr(pl_module, "mixer", None) is not None:  # cached logits go unused
                rank_zero_info("TeacherLogitCache: training batches are mixed (mixup), their teacher logits stay live")
                continue
            teacher_key = teacher_key or weights_digest(teacher)
            key = hashlib.sha256((teacher_key + split_fingerprint(dataset)).encode()).hexdigest()[:32]
            logits = self._load_or_compute(key, teacher, dataset, trainer, pl_module, split)
            dataset.teacher_logits = logits.to(dataset.device)  # on the GPU with the images, if they are there

    def _load_or_compute(
        self,
        key: str,
        teacher: nn.Module,
        dataset: TensorImageDataset,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str,
    ) -> torch.Tensor:
        if self.cache_dir is None:
            return self._compute(teacher, dataset, trainer, pl_module)
        path = self.cache_dir / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path):  # workers started together: one fills the file, the others wait and read it
            logits = _read_cached(path, key, len(dataset))
            if logits is not None:
                self.hits.append(split)
                return logits
            logits = self._compute(teacher, dataset, trainer, pl_module)
            with atomic_path(path) as partial:  # a reader without the lock never sees half a file
                torch.save({"key": key, "logits": logits}, partial)
        return logits

    def _compute(
        self, teacher: nn.Module, dataset: TensorImageDataset, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> torch.Tensor:
        device = next(pl_module.student.parameters()).device
        return compute_logits(teacher, dataset, device, self.batch_size, trainer.precision_plugin.forward_context)


def _read_cached(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """The logits in ``path`` when it holds ``key``'s, one row per image; else ``None``."""
    if not path.is_file():
        return None
    try:
        cached = read_checkpoint(path)
    except ValueError as err:
        rank_zero_warn(f"TeacherLogitCache: {err} It is computed again.")
        return None
    logits = cached.get("logits")
    valid = cached.get("key") == key and isinstance(logits, torch.Tensor) and logits.shape[:1] == (rows,)
    return logits if valid else None
