"""How channels are chosen: one ``PruningPolicy``, taken by every pruning entry point.

Like torch-pruning's pruner object, the policy holds the criterion, the ranking, the floors, the
rounding and the ignored layers, so that :func:`~distill.pruning.prune_student`,
:class:`~distill.pruning.ChannelPruning` and ``distill prune-distill`` read the same settings the same
way. Floors are of the channels each layer had when pruning *started* (:meth:`PruningPolicy.floors`):
a student pruned in several steps never falls below ``min_fraction`` of its original width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral

import numpy as np
import torch

from distill.data.batch import as_batch
from distill.pruning.importance import CRITERIA, Importance, resolve_importance

__all__ = ["CHANNEL_MULTIPLE", "PruningPolicy", "labelled_batches", "removal_order"]

#: Kept channel counts are rounded to a multiple of this by default (``PruningPolicy.round_to``).
#: Measured (``benchmarks/channel_multiple.py``, RESULTS.md): in ONNX Runtime's CPU provider on AVX-512, a
#: StudentNet whose middle layers have 112-144 channels ran 3.5-4.1x slower at every count that is not a
#: multiple of 4 (such convolutions fall out of its NCHWc layout), and multiples of 4, 8 and 16 ran alike.
#: 8 leaves a margin: AVX2's NCHWc blocks are 8 channels, and tensor cores want multiples of 8.
CHANNEL_MULTIPLE = 8


@dataclass(frozen=True)
class PruningPolicy:
    """Which channels go: the criterion, global or per-layer ranking, floors, rounding, untouched layers.

    Args:
        importance: criterion name (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``) or a
            callable ``group -> scores`` (see :mod:`distill.pruning.importance`).
        global_ranking: rank channels across layers instead of removing the same ratio from every layer.
        min_channels: every layer keeps at least this many channels.
        min_fraction: every layer keeps at least this fraction of its channels when pruning started.
        round_to: kept channel counts (floors too) are rounded up to a multiple of this, what the runtimes run
            fast (:data:`CHANNEL_MULTIPLE`; 1: any count). A layer narrower than it is not pruned.
        ignored_layers: names of student layers whose output channels never change.
        num_batches: training batches the data-driven criteria (``taylor``, ``hrank``) look at.
        ignore_unprunable: where pruning a layer breaks the student (its channels split by sizes fixed when it
            was built: MixNet's ``MixedConv2d``, LeViT's attention), keep that layer's channels and prune the rest,
            instead of refusing: the layers a refusal names are added to ``ignored_layers`` and the step runs
            again (:attr:`~distill.pruning.PruneReport.kept_layers` lists them).
    """

    importance: str | Importance = "l1"
    global_ranking: bool = False
    min_channels: int = 1
    min_fraction: float = 0.0
    round_to: int = CHANNEL_MULTIPLE
    ignored_layers: Sequence[str] = field(default=())
    num_batches: int = 4
    ignore_unprunable: bool = False

    def __post_init__(self) -> None:
        flags = {"global_ranking": self.global_ranking, "ignore_unprunable": self.ignore_unprunable}
        wrong = {name: value for name, value in flags.items() if not isinstance(value, (bool, np.bool_))}
        if wrong:  # "false" is a true string: it would silently turn the option on
            raise ValueError(f"{', '.join(wrong)} must be True or False, got {', '.join(map(repr, wrong.values()))}")
        counts = {"min_channels": self.min_channels, "round_to": self.round_to, "num_batches": self.num_batches}
        wrong = {n: v for n, v in counts.items() if isinstance(v, (bool, np.bool_)) or not isinstance(v, Integral)}
        if wrong:
            what = "a whole number" if len(wrong) == 1 else "whole numbers"
            raise ValueError(f"{', '.join(wrong)} must be {what}, got {', '.join(map(repr, wrong.values()))}")
        if isinstance(self.ignored_layers, str):  # a name would be read as a list of its letters
            raise ValueError(f"ignored_layers is a list of layer names: give [{self.ignored_layers!r}]")
        if isinstance(self.importance, str) and self.importance not in CRITERIA:
            raise ValueError(f"Unknown importance criterion {self.importance!r}; choose one of {', '.join(CRITERIA)}")
        if self.min_channels < 1 or not 0.0 <= self.min_fraction < 1.0 or self.round_to < 1 or self.num_batches < 1:
            raise ValueError(
                "need min_channels >= 1, 0 <= min_fraction < 1, round_to >= 1 and num_batches >= 1; got "
                f"{self.min_channels}, {self.min_fraction}, {self.round_to}, {self.num_batches}"
            )
        object.__setattr__(self, "ignored_layers", tuple(self.ignored_layers))

    def keeping(self, layers: Iterable[str]) -> PruningPolicy:
        """This policy with ``layers`` added to its ``ignored_layers`` (those it holds already kept once)."""
        return replace(self, ignored_layers=tuple(dict.fromkeys((*self.ignored_layers, *layers))))

    def criterion(self) -> Importance:
        """A fresh criterion (data-driven ones collect their statistics anew each step)."""
        return resolve_importance(self.importance, self.num_batches)

    def floors(self, channels: Mapping[str, int]) -> dict[str, int]:
        """The channels each group keeps at least, given its channel count when pruning started."""
        return {name: max(self.min_channels, math.ceil(self.min_fraction * n)) for name, n in channels.items()}


def labelled_batches(
    loader: Iterable, num_batches: int, device: torch.device | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``num_batches`` ``(x, y)`` of ``loader`` (cached teacher logits left out), for a criterion."""
    for i, batch in enumerate(loader):
        if i == num_batches:
            return
        x, y = as_batch(batch)[:2]
        yield (x, y) if device is None else (x.to(device), y.to(device))


def removal_order(scores: torch.Tensor, slices: int = 1) -> list[int]:
    """A group's channels in the order they are removed: lowest score first.

    With ``slices`` > 1 (a grouped conv, attention heads: :func:`~distill.pruning.surgery.channel_slices`) the
    channels come in equal slices that must lose the same positions, so they go a position at a time (ranked
    by the mean score of its channels), every slice's channel at that position together.
    """
    size = len(scores) // slices
    position = scores.float().reshape(slices, size).mean(0)
    return [p + k * size for p in torch.argsort(position, stable=True).tolist() for k in range(slices)]
