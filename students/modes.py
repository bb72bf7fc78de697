"""A model's train/eval mode, changed for a while with every submodule's own mode given back after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "forget_eval_caches"]


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Give every submodule of ``model`` back, after the block, the mode it had before it."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then give every submodule back its own mode (frozen parts stay frozen)."""
    with _modes_kept(model):
        yield model.eval()


def forget_eval_caches(model: nn.Module) -> None:
    """Put ``model`` through ``train()`` and give every submodule back its mode.

    timm's LeViT and EfficientViT cache their attention biases at the first forward in eval mode and drop them
    in ``train()``; cached under autograd (tracing, Taylor scores) they hold a graph, which ``copy.deepcopy``
    of the model refuses.
    """
    with _modes_kept(model):
        model.train()
