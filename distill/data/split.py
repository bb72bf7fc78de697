"""The train/validation split: a fixed part of the training set held out for choosing settings."""

from __future__ import annotations

import torch

__all__ = ["check_val_size", "split_indices"]


def check_val_size(val_size: int | float) -> None:
    """Refuse a ``val_size`` that is neither a count (an integer >= 1) nor a fraction in (0, 1)."""
    count = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 1
    fraction = isinstance(val_size, float) and 0 < val_size < 1
    if not (count or fraction):
        raise ValueError(
            f"val_size must be a number of images (an integer >= 1) or a fraction in (0, 1), got {val_size!r}"
        )


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and validation indices of an ``n``-image training set, fixed by ``seed``."""
    check_val_size(val_size)
    n_val = round(val_size * n) if isinstance(val_size, float) else val_size
    if not 0 < n_val < n:
        raise ValueError(
            f"val_size={val_size} leaves no training or no validation images out of {n}: give fewer than {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
