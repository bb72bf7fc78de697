"""What a student costs: parameters, MACs and size on disk (its latency: :mod:`distill.latency`).

Pruning results are compared at equal cost in these units, not by a ratio of channels (seed 001).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params", "eval_mode", "size_on_disk"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then give every submodule back its own mode (frozen parts stay frozen)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def forget_eval_caches(model: nn.Module) -> None:
    """Put ``model`` through ``train()`` and give every submodule back its mode.

    timm's LeViT and EfficientViT cache their attention biases at the first forward in eval mode and drop them
    in ``train()``; cached under autograd (tracing, Taylor scores) they hold a graph, which ``copy.deepcopy``
    of the model refuses.
    """
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m, training in modes.items():
        m.training = training


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one eval-mode forward on ``example_input`` (convolutions and matmuls).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2). Normalisation, activations
    and pooling are not counted, as is usual for MACs.
    """
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(example_input)
    return counter.get_total_flops() // 2


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
