"""A teacher that never trains: no gradients, eval mode locked, forward under ``no_grad``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrozenModule", "FrozenTeacher"]


class FrozenModule(nn.Module):
    """Base for frozen modules: ``train()`` always sets eval mode, parameters never require grad.

    Lightning calls ``.train()`` on the whole LightningModule at every epoch start; a teacher in
    train mode would update its BatchNorm statistics and apply dropout. Here ``.train()`` is a no-op.
    """

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:  # the mode is ignored on purpose
        return super().train(False)


class FrozenTeacher(FrozenModule):
    """Wraps a trained model as a frozen teacher.

    Args:
        model: the trained network.
        checkpoint: the file its weights came from, recorded for reproducibility.
    """

    def __init__(self, model: nn.Module, checkpoint: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint
        self.freeze()

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    @property
    def checkpoints(self) -> list[str]:
        return [self.checkpoint] if self.checkpoint else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)
