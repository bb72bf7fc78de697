"""The batch contract: what every datamodule's loaders yield and every consumer reads.

A batch is a :class:`Batch` ``(x, y, teacher_logits)``: the images, the labels, and the teacher's
logits for those images when :class:`distill.cache.TeacherLogitCache` serves them instead of a
teacher forward (else ``None``). Plain ``(x, y)`` tuples from any DataLoader (a user's own) are
batches too: :func:`as_batch` reads either form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import default_collate

__all__ = ["Batch", "as_batch", "collate_batch", "collate_samples"]


class Batch(NamedTuple):
    """Images, labels, and the teacher's logits when a cache serves them (else ``None``)."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor | None = None


def as_batch(batch: Sequence[torch.Tensor]) -> Batch:
    """A :class:`Batch` from a loader's ``(x, y)`` or ``(x, y, teacher_logits)``."""
    if isinstance(batch, Batch):
        return batch
    if not 2 <= len(batch) <= 3:
        raise ValueError(f"a batch is (x, y) or (x, y, teacher_logits), got {len(batch)} entries")
    return Batch(*batch)


def collate_batch(batch: Batch) -> Batch:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns the whole :class:`Batch`."""
    return batch


def collate_samples(samples: Sequence[tuple[Any, ...]]) -> Batch:
    """``collate_fn`` for datasets of ``(image, label)`` samples: torch's default collation, as a :class:`Batch`."""
    return Batch(*default_collate(samples))
