"""Channel importance criteria: each maps a torch-pruning group to one score per channel.

A group is a set of coupled layers that lose the same channels together (a producer conv, its BN,
a depthwise conv, the consumer's input channels, residual partners). A criterion is any callable
``group -> Tensor | None`` (``None``: no opinion, the group is left alone), so torch-pruning's own
importances and user functions plug in as they are. Low scores are pruned first.

- ``bn_scale``: |gamma| of the group's BatchNorms (Liu et al. 2017, "Learning Efficient Convolutional
  Networks through Network Slimming"), torch-pruning's ``BNScaleImportance``; raw values, for one global
  threshold. Groups without a BatchNorm get no score and are not pruned.

Ours, where torch-pruning's would choose other channels:

- ``l1`` / ``l2``: norm of each filter of the group's *producer* (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets"), divided by the layer's mean so layers compare in a global ranking. torch-pruning's
  ``MagnitudeImportance(group_reduction="first")`` scores the layer a group lists first: the producer in a
  ResNet, but in some of StudentNet's groups the depthwise conv that only passes the channels on
  (``tests/test_pruning.py`` shows both).
- ``taylor``: |sum over the filter of grad x weight| (Molchanov et al. 2017/2019, first-order Taylor
  expansion of the loss); layer-mean normalised. torch-pruning's ``TaylorImportance`` reads whatever
  gradients the model holds when it scores; this one sums the cross-entropy's gradients over
  ``num_batches`` batches with BatchNorm frozen, and gives the model its own gradients back.
- ``hrank``: the mean matrix rank of each channel's output feature maps over a few batches (Lin et
  al. 2020, "HRank: Filter Pruning using High-Rank Feature Map"; seed 003). torch-pruning has none.
- ``random``: a baseline, seeded (torch-pruning's draws from the global generator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from students.modes import eval_mode, forget_eval_caches

__all__ = [
    "CRITERIA",
    "DataDrivenImportance",
    "FilterNormImportance",
    "HRankImportance",
    "Importance",
    "RandomImportance",
    "TaylorImportance",
    "producer",
    "resolve_importance",
]

#: A criterion: group -> one score per channel of the group's root (or None to skip the group).
Importance = Callable[[Any], torch.Tensor | None]
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


@runtime_checkable
class DataDrivenImportance(Protocol):
    """A criterion that must see data first: ``collect`` runs before the groups are scored."""

    def collect(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None: ...

    def __call__(self, group: Any) -> torch.Tensor | None: ...


def producer(group: Any) -> tuple[nn.Module, list[int], list[int]] | None:
    """The layer that produces a group's channels, its channel indices, and those indices in root numbering.

    That is the first conv/linear in the group whose output channels are pruned and which is not a
    depthwise conv (a depthwise conv only passes its input channels on).
    """
    for i, (dep, idxs) in enumerate(group):
        layer = dep.target.module
        depthwise = isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels
        if isinstance(layer, _PRODUCERS) and not depthwise and dep.handler.__name__ == "prune_out_channels":
            return layer, list(idxs), list(group[i].root_idxs)
    return None


def _producer_scores(group: Any, per_layer: dict[nn.Module, torch.Tensor]) -> torch.Tensor | None:
    """Scores of the producer's output channels (from ``per_layer``) in the group's root order."""
    found = producer(group)
    if found is None or found[0] not in per_layer:
        return None
    layer, idxs, root_idxs = found
    scores = torch.zeros(len(group[0][1]))  # several filters may feed one channel (q, k and v of a head position)
    scores.index_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), per_layer[layer][idxs].float().cpu())
    return scores


def _mean_normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.mean().clamp_min(1e-12)


class FilterNormImportance:
    """Norm of each filter of the group's producer (Li et al. 2017), divided by the layer's mean norm.

    Args:
        p: 1 for the L1 norm, 2 for the L2 norm.
    """

    def __init__(self, p: int = 1) -> None:
        self.p = p

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        found = producer(group)
        if found is None:
            return None
        layer = found[0]
        norms = layer.weight.detach().flatten(1).norm(p=self.p, dim=1)
        scores = _producer_scores(group, {layer: norms})
        return None if scores is None else _mean_normalised(scores)


class TaylorImportance:
    """|sum over each filter of (summed gradient x weight)| of the group's producer layer.

    Args:
        num_batches: batches whose gradients of the cross-entropy are summed.
    """

    def __init__(self, num_batches: int = 4) -> None:
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def collect(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        saved = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()}
        model.zero_grad(set_to_none=True)
        seen = 0
        try:
            with eval_mode(model):  # BatchNorm statistics must not move while we measure
                for x, y in batches:
                    F.cross_entropy(model(x), y).backward()
                    # LeViT and EfficientViT cache attention biases in eval mode: the next batch's backward
                    # would go through this batch's graph again
                    forget_eval_caches(model)
                    seen += 1
                    if seen == self.num_batches:
                        break
            if seen == 0:
                raise ValueError("taylor importance received no batches")
            self.scores = {
                m: (m.weight.grad * m.weight).detach().flatten(1).sum(1).abs()
                for m in model.modules()
                if isinstance(m, _PRODUCERS) and m.weight.grad is not None
            }
        finally:
            for p, grad in saved.items():
                p.grad = grad
            forget_eval_caches(model)  # what LeViT caches in eval mode would hold our graph

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = _producer_scores(group, self.scores)
        return None if scores is None else _mean_normalised(scores)


class HRankImportance:
    """Mean matrix rank of each output channel's H x W feature maps of the group's producer conv.

    The rank of a filter's feature maps barely changes from batch to batch (Lin et al. 2020), so a
    few batches suffice. 1x1 maps have rank 0 or 1 only: the criterion is weak on tiny resolutions.

    Args:
        num_batches: batches to average over.
        max_images: images per batch whose maps are decomposed (SVD cost).
    """

    def __init__(self, num_batches: int = 4, max_images: int = 32) -> None:
        if num_batches < 1 or max_images < 1:
            raise ValueError(f"num_batches and max_images must be >= 1, got {num_batches} and {max_images}")
        self.num_batches = num_batches
        self.max_images = max_images
        self.scores: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def collect(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        totals: dict[nn.Module, torch.Tensor] = {}

        def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            maps = output[: self.max_images].float()
            rank = torch.linalg.matrix_rank(maps).float().mean(0)  # (C,)
            totals[module] = totals.get(module, 0) + rank.cpu()

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        handles = [m.register_forward_hook(hook) for m in convs]
        seen = 0
        try:
            with eval_mode(model):
                for x, _ in batches:
                    model(x)
                    seen += 1
                    if seen == self.num_batches:
                        break
        finally:
            for h in handles:
                h.remove()
        if seen == 0:
            raise ValueError("hrank importance received no batches")
        self.scores = {m: total / seen for m, total in totals.items()}

    def __call__(self, group: Any) -> torch.Tensor | None:
        return _producer_scores(group, self.scores)


class RandomImportance:
    """Uniform random scores: the baseline every criterion should beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0][1]), generator=self.generator)


#: Criteria by name: each a factory of the number of batches a data-driven criterion looks at.
CRITERIA: dict[str, Callable[[int], Importance]] = {
    "l1": lambda _num_batches: FilterNormImportance(p=1),
    "l2": lambda _num_batches: FilterNormImportance(p=2),
    "bn_scale": lambda _num_batches: tp.importance.BNScaleImportance(normalizer=None),
    "taylor": lambda num_batches: TaylorImportance(num_batches),
    "hrank": lambda num_batches: HRankImportance(num_batches),
    "random": lambda _num_batches: RandomImportance(),
}


def resolve_importance(importance: str | Importance, num_batches: int = 4) -> Importance:
    """A criterion from its name (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``) or a callable.

    ``num_batches``: the batches a data-driven criterion (``taylor``, ``hrank``) looks at.
    """
    if callable(importance):
        return importance
    if importance not in CRITERIA:
        raise ValueError(
            f"Unknown importance criterion {importance!r}; choose one of {', '.join(CRITERIA)} or pass a callable"
        )
    return CRITERIA[importance](num_batches)
