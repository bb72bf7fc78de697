"""What a student costs: parameters, MACs, memory and size on disk (its latency: :mod:`distill.latency`).

Pruning results are compared at equal cost in these units, not by a ratio of channels (seed 001).
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from students.modes import eval_mode

__all__ = ["activation_floor", "check_runs_on", "count_macs", "count_params", "size_on_disk"]


def check_runs_on(model: nn.Module, example_input: torch.Tensor) -> Any:
    """``model``'s eval-mode output on ``example_input``; refuses, in one line, an input it does not run on (other
    channels, no batch dimension, another dtype or device): a trace or an export of it failed with an error deep in
    torch that blamed the model."""
    try:
        with torch.no_grad(), eval_mode(model):
            return model(example_input)
    except Exception as err:  # noqa: BLE001 - the model fails with any error
        why = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"{type(model).__name__} does not run on the example input of shape {tuple(example_input.shape)} "
            f"({type(err).__name__}: {why}): {_input_fix(model, example_input)}"
        ) from None


def _input_fix(model: nn.Module, example_input: torch.Tensor) -> str:
    """What to change in an input ``model`` fails on: its device or dtype where the model runs on the input moved
    to its weights' (a uint8 image, a batch left on the CPU), else its shape."""
    weights = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    if weights is not None and (example_input.device, example_input.dtype) != (weights.device, weights.dtype):
        try:
            with torch.no_grad(), eval_mode(model):
                model(example_input.to(weights.device, weights.dtype))
        except Exception:  # noqa: BLE001 - not (only) the device or dtype
            pass
        else:
            return f"give it as {weights.dtype} on {weights.device}, as the model's weights are"
    return "give one shaped as its data, (1, channels, height, width)"


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


@torch.no_grad()
def activation_floor(model: nn.Module, example_shape: tuple[int, ...]) -> int | None:
    """At least how many bytes an eval-mode forward of a batch of ``example_shape`` holds at once: the largest
    inputs plus outputs of one module without children (each tensor once; views and in-place outputs, which share
    memory, not again), the input in the weights' dtype. Found on the meta device, so that nothing is allocated:
    ``None`` where the model cannot run there (an operator without a meta kernel, a shape read as a number)."""
    held: list[int] = []

    def hook(_: nn.Module, args: tuple, out: object) -> None:
        tensors = (t for t in (*args, *(out if isinstance(out, tuple | list) else (out,))) if torch.is_tensor(t))
        unique = {id(t): t for t in tensors if not t._is_view()}.values()
        held.append(sum(t.numel() * t.element_size() for t in unique))

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    weights = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(),
                                                                          *model.named_buffers()]}  # fmt: skip
    try:
        with eval_mode(model):
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
            torch.func.functional_call(model, weights, (torch.empty(example_shape, dtype=dtype, device="meta"),))
    except Exception:  # noqa: BLE001 - any failure on the meta device only means: not known
        return None
    finally:
        for handle in handles:
            handle.remove()
    return max(held, default=0)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
