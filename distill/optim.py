"""Optimizers, a learning-rate schedule as a pure function of the step, and the settings a resume keeps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_SETTINGS",
    "SCHEDULES",
    "build_optimizer",
    "check_resume_settings",
    "lr_factor",
    "param_groups",
]

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


#: ``DistillModule`` hyperparameters whose values a resumed run takes from the checkpoint's optimizer state.
OPTIMIZER_SETTINGS = ("optimizer", "lr", "weight_decay", "momentum", "scheduler", "warmup_epochs", "min_lr_ratio")


def check_resume_settings(checkpoint: Mapping[str, Any], settings: Mapping[str, Any], source: str) -> None:
    """Refuse to resume ``checkpoint`` with other optimizer settings than it was trained with.

    Resuming restores the checkpoint's optimizer state, so other settings would be ignored without a word.
    """
    recorded = checkpoint.get("hyper_parameters") or {}
    changed = [k for k in OPTIMIZER_SETTINGS if k in recorded and k in settings and recorded[k] != settings[k]]
    if changed:
        raise ValueError(
            f"{source} was trained with {', '.join(f'{k}={recorded[k]!r}' for k in changed)}, but this run sets "
            f"{', '.join(f'{k}={settings[k]!r}' for k in changed)}. Resuming restores the checkpoint's optimizer "
            f"state, which would ignore them: resume with the original settings, or start a new run."
        )
