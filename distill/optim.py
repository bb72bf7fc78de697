"""Optimizers and a learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "lr_factor", "param_groups"]

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "constant")


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Literal["cosine", "constant"] = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then cosine decay or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; none on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: Iterable[dict], name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimizer by name: ``sgd`` (Nesterov momentum), ``adamw`` or ``adam``.

    On CUDA the fused implementation is used (one kernel per step instead of one per tensor).
    """
    groups = list(groups)
    fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=fused or None)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
