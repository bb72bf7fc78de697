"""A teacher that never trains: no gradients, eval mode locked, forward under ``no_grad``."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["FrozenModule", "FrozenTeacher", "weights_digest"]


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
        load_args: :func:`teachers.load_teacher`'s arguments that load it again, where the file alone does not
            (it does not name its architecture, or EMA weights or a prefix were chosen).
    """

    def __init__(
        self, model: nn.Module, checkpoint: str | None = None, load_args: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint
        self.load_args = load_args
        self.freeze()

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    @property
    def trained_on(self) -> tuple[str, dict[str, Any]] | None:
        """The datamodule class name and record it was trained on, where its file holds them (a checkpoint of
        ``distill fit``: ``students.load_recorded_student``): the data it teaches on is checked against them."""
        return getattr(self.model, "trained_on", None)

    @property
    def source(self) -> str | dict[str, Any] | None:
        """What :func:`teachers.load_teachers` loads this teacher again from: its file, or the arguments."""
        return (self.load_args or self.checkpoint) if self.checkpoint else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of a module's ``state_dict`` as stored (names, shapes and values) and of its own
    settings (``extra_repr``: an ensemble's weights, reduction and temperature): the same teacher has the same digest
    wherever its file lies, and a teacher retrained in place has another."""
    digest = hashlib.sha256(f"{type(module).__name__}({module.extra_repr()})".encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
