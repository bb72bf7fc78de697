"""Physical channel pruning of a student: choose channels by importance, remove them with torch-pruning.

torch-pruning's dependency graph (Fang et al. 2023, "DepGraph") finds the coupled layers that must
lose the same channels: a producer conv, its BatchNorm, a depthwise conv, the consumer's input
channels, and the partners of residual additions. This module decides *which* channels go, as a
:class:`~distill.pruning.policy.PruningPolicy` says (per-layer or global ranking, floors, ``round_to``), for a
ratio, a parameter/MAC target or a latency target measured on the runtime (:mod:`distill.pruning.search`),
removes them, and reports the result.
The stem's input (the image channels) and the classifier's outputs (the classes) are never pruned.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from distill.profile import count_macs, count_params, eval_mode
from distill.pruning.importance import DataDrivenImportance, Importance, producer, resolve_importance
from distill.pruning.policy import PruningPolicy
from distill.pruning.search import LatencyMeasure, latency_plan
from students import mark_pruned

__all__ = [
    "PruneReport",
    "apply_plan",
    "channel_counts",
    "channel_groups",
    "check_latency_target",
    "check_target",
    "plan_pruning",
    "prune_student",
    "select_channels",
]

#: Channels to remove, by the name of the layer that produces each group's channels.
Plan = dict[str, list[int]]
#: Channels each group keeps at least, by group name (``None``: the policy's floors of the current channels).
Floors = Mapping[str, int] | None


@dataclass
class PruneReport:
    """What one pruning step did."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_before: dict[str, int] = field(default_factory=dict)
    channels_after: dict[str, int] = field(default_factory=dict)
    #: with a latency target: the pruned student's milliseconds, as the search measured them
    latency_ms: float | None = None

    def __str__(self) -> str:
        lines = [
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / max(1, self.macs_before):.1%})"
            + (f", {self.latency_ms:.3f} ms measured" if self.latency_ms is not None else ""),
            "| layer | channels before | after |",
            "|---|---:|---:|",
        ]
        lines += [f"| {n} | {c} | {self.channels_after[n]} |" for n, c in self.channels_before.items()]
        return "\n".join(lines)


def _classifier(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def channel_groups(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[str] = ()) -> dict[str, Any]:
    """The prunable groups of ``model``, by the name of the layer that produces their channels.

    A group is left out when it would change the output channels of the classifier or of a layer
    named in ``ignored_layers``.
    """
    names = {m: n for n, m in model.named_modules()}
    missing = [n for n in ignored_layers if n not in names.values()]
    if missing:
        some = ", ".join(n for n in list(names.values())[1:12])
        raise ValueError(f"ignored_layers names no layer of the student: {missing}. Its layers: {some}, ...")
    frozen = {model.get_submodule(n) for n in ignored_layers}
    head = _classifier(model)
    if head is not None:
        frozen.add(head)
    frozen = {sub for m in frozen for sub in m.modules()}
    # torch-pruning traces the graph through autograd, in eval mode
    with torch.enable_grad(), eval_mode(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    groups = {}
    for group in graph.get_all_groups(ignored_layers=list(frozen), root_module_types=[nn.Conv2d, nn.Linear]):
        if any(dep.target.module in frozen and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
            continue
        groups[_group_name(group, names)] = group
    return groups


def _group_name(group: Any, names: Mapping[nn.Module, str]) -> str:
    """Name a group after the layer that produces its channels (not a depthwise conv that passes them on)."""
    found = producer(group)
    return names[found[0] if found is not None else group[0].dep.target.module]


def _keep_count(n: int, ratio: float, floor: int, round_to: int) -> int:
    """Channels a group of ``n`` keeps at ``ratio``: at least ``floor``, rounded up to a multiple of ``round_to``
    (the floor too: a rounded count is what the runtime runs fast), at most ``n``."""
    keep = max(floor, math.ceil(n * (1.0 - ratio) - 1e-9))
    return min(n, math.ceil(keep / round_to) * round_to)


def plan_pruning(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    floors: Mapping[str, int],
    global_ranking: bool = False,
    round_to: int = 1,
) -> Plan:
    """Which channels to remove from each group at ``ratio``.

    Per-layer ranking removes ``ratio`` of every group's channels; global ranking removes the
    ``ratio`` of all channels with the lowest scores, wherever they are. Either way each group keeps
    at least its floor, and a kept count is rounded up to a multiple of ``round_to``.
    """
    keep: dict[str, int] = {}
    if global_ranking:
        flat = torch.cat([s.float() for s in scores.values()])
        owners = [name for name, s in scores.items() for _ in range(len(s))]
        budget = math.floor(ratio * len(flat) + 1e-9)
        left = {name: len(s) for name, s in scores.items()}
        for i in torch.argsort(flat, stable=True).tolist():
            if budget == 0:
                break
            name = owners[i]
            if left[name] > floors[name]:
                left[name] -= 1
                budget -= 1
        keep = {
            name: _keep_count(len(scores[name]), 1 - left[name] / len(scores[name]), floors[name], round_to)
            for name in scores
        }
    else:
        keep = {name: _keep_count(len(s), ratio, floors[name], round_to) for name, s in scores.items()}
    return {
        name: sorted(torch.argsort(s.float(), stable=True)[: len(s) - keep[name]].tolist())
        for name, s in scores.items()
        if keep[name] < len(s)
    }


def apply_plan(model: nn.Module, example_input: torch.Tensor, plan: Plan, ignored_layers: Sequence[str] = ()) -> None:
    """Remove the planned channels from ``model`` in place."""
    groups = channel_groups(model, example_input, ignored_layers)
    for name, idxs in plan.items():
        if idxs:
            groups[name].prune(idxs)


def _score(importance: Importance, groups: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    scores = {}
    for name, group in groups.items():
        s = importance(group)
        if s is not None:
            scores[name] = s.detach().float().cpu()
    return scores


def channel_counts(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[str] = ()) -> dict[str, int]:
    """The channels of each prunable group of ``model``, by group name (see :func:`channel_groups`)."""
    return {name: len(group[0][1]) for name, group in channel_groups(model, example_input, ignored_layers).items()}


def _size(model: nn.Module, example_input: torch.Tensor, target_params: int | None) -> int:
    """Parameters when the target is a parameter count, else MACs per forward of ``example_input``."""
    return count_params(model) if target_params is not None else count_macs(model, example_input)


def _scored(
    model: nn.Module, example_input: torch.Tensor, criterion: Importance, policy: PruningPolicy, floors: Floors
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each group's channel scores, and its floor (``floors``, or the policy's of its current channels)."""
    scores = _score(criterion, channel_groups(model, example_input, policy.ignored_layers))
    if not scores:
        raise ValueError("the criterion scored no layer (e.g. bn_scale on a model without BatchNorm)")
    own = policy.floors({name: len(s) for name, s in scores.items()})
    return scores, {name: (floors or {}).get(name, own[name]) for name in scores}


def select_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None = None,
    *,
    ratio: float | None = None,
    target_params: int | None = None,
    target_macs: int | None = None,
    target_latency_ms: float | None = None,
    latency: LatencyMeasure | None = None,
    floors: Floors = None,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Plan:
    """Decide which channels to remove, without touching ``model`` (see :func:`prune_student`)."""
    return _select(model, example_input, policy, ratio=ratio, target_params=target_params, target_macs=target_macs,
                   target_latency_ms=target_latency_ms, latency=latency, floors=floors, data=data)[0]  # fmt: skip


def _select(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None,
    *,
    ratio: float | None = None,
    target_params: int | None = None,
    target_macs: int | None = None,
    target_latency_ms: float | None = None,
    latency: LatencyMeasure | None = None,
    floors: Floors = None,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[Plan, float | None]:
    """:func:`select_channels`, and with a latency target the chosen layout's measured milliseconds."""
    policy = policy or PruningPolicy()
    if sum(v is not None for v in (ratio, target_params, target_macs, target_latency_ms)) != 1:
        raise ValueError("give exactly one of ratio, target_params, target_macs or target_latency_ms")
    if target_latency_ms is not None and (latency is None or not 0 < target_latency_ms < math.inf):
        raise ValueError(
            "a latency target needs a positive, finite target_latency_ms and latency=, what times the student "
            f"(e.g. distill.latency.LatencyMeter(input_shape)); got {target_latency_ms} and {latency}"
        )
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of channels to remove), got {ratio}")
    target = target_params if target_params is not None else target_macs
    if target is not None:
        have = _size(model, example_input, target_params)
        if not 0 < target < have:
            name = "target_params" if target_params is not None else "target_macs"
            raise ValueError(f"{name}={target:,} must be positive and below the student's current {have:,}")

    criterion = policy.criterion()
    if isinstance(criterion, DataDrivenImportance):
        if data is None:
            label = policy.importance if isinstance(policy.importance, str) else type(criterion).__name__
            raise ValueError(f"the {label!r} criterion is data-driven: pass data=batches of (x, y)")
        criterion.collect(model, data)
    scores, floors = _scored(model, example_input, criterion, policy, floors)

    def make(r: float) -> Plan:
        return plan_pruning(scores, r, floors, policy.global_ranking, policy.round_to)

    if ratio is not None:
        return make(ratio), None
    if target_latency_ms is not None:

        def apply(trial: nn.Module, plan: Plan) -> None:
            apply_plan(trial, example_input, plan, policy.ignored_layers)

        return latency_plan(model, scores, floors, policy.round_to, target_latency_ms, latency, apply)

    def cost(r: float) -> int:
        trial = copy.deepcopy(model)
        apply_plan(trial, example_input, make(r), policy.ignored_layers)
        return _size(trial, example_input, target_params)

    _check_smallest(model, example_input, scores, floors, policy, target_params, target_macs)
    lo, hi = 0.0, 1.0 - 1e-9  # cost(lo) > target >= cost(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return make(hi), None


def check_target(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None = None,
    *,
    target_params: int | None = None,
    target_macs: int | None = None,
    floors: Floors = None,
) -> None:
    """Refuse a size target that pruning ``model`` cannot reach without breaking a floor.

    Cheap (one pruned copy, no data), so jobs check their final target before they start.
    """
    policy = policy or PruningPolicy()
    scores, floors = _scored(model, example_input, resolve_importance("l1"), policy, floors)  # any criterion: size
    _check_smallest(model, example_input, scores, floors, policy, target_params, target_macs)


def check_latency_target(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None,
    target_latency_ms: float,
    latency: LatencyMeasure,
    floors: Floors = None,
) -> tuple[float, float]:
    """Refuse a latency target that pruning ``model`` cannot reach; the student's and its smallest layout's ms.

    Both are timed side by side by ``latency``: the student, and a copy with every prunable layer at its floor.
    """
    policy = policy or PruningPolicy()
    scores, floors = _scored(model, example_input, resolve_importance("l1"), policy, floors)  # any criterion: size
    smallest = copy.deepcopy(model)
    plan = plan_pruning(scores, 1.0 - 1e-9, floors, False, policy.round_to)
    apply_plan(smallest, example_input, plan, policy.ignored_layers)
    ms = latency({"student": model, "smallest": smallest})
    where = getattr(latency, "describe", lambda: "the runtime")()
    if target_latency_ms >= ms["student"]:
        raise ValueError(
            f"target {target_latency_ms:.3f} ms is not below the student's {ms['student']:.3f} ms ({where}): "
            f"nothing to prune"
        )
    if ms["smallest"] > target_latency_ms:
        raise ValueError(
            f"target {target_latency_ms:.3f} ms cannot be met: with every prunable layer at its floor the student "
            f"still runs in {ms['smallest']:.3f} ms ({where}). Lower min_fraction, prune more layers (ignored_layers), "
            f"or raise the target."
        )
    return ms["student"], ms["smallest"]


def _check_smallest(
    model: nn.Module,
    example_input: torch.Tensor,
    scores: Mapping[str, torch.Tensor],
    floors: Mapping[str, int],
    policy: PruningPolicy,
    target_params: int | None,
    target_macs: int | None,
) -> None:
    trial = copy.deepcopy(model)  # every scored layer at its floor
    plan = plan_pruning(scores, 1.0 - 1e-9, floors, False, policy.round_to)
    apply_plan(trial, example_input, plan, policy.ignored_layers)
    target = target_params if target_params is not None else target_macs
    smallest = _size(trial, example_input, target_params)
    if smallest > target:
        unit = "parameters" if target_params is not None else "MACs"
        raise ValueError(
            f"target {target:,} {unit} cannot be met without emptying a layer: with every prunable layer at its "
            f"floor the student still has {smallest:,}. Lower min_channels/min_fraction, prune more layers, "
            f"or raise the target."
        )


def prune_student(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None = None,
    *,
    plan: Plan | None = None,
    **amount: Any,
) -> PruneReport:
    """Remove channels from ``model`` in place and report the cost before and after.

    Give exactly one of ``ratio``, ``target_params``, ``target_macs`` or ``target_latency_ms``. A size target
    is met by bisecting the ratio on copies of the model: the result is the least-pruned model at or under the
    target. A latency target is met by the measured search of :mod:`distill.pruning.search` (NetAdapt, HALP):
    layers lose channels by importance per millisecond saved on the runtime ``latency`` times, and the result
    was measured at or under the target (``PruneReport.latency_ms``).

    Args:
        model: the student (a StudentNet or any timm model).
        example_input: a batch shaped like the data (e.g. ``torch.zeros(1, 1, 28, 28)``); MACs are per
            forward of this batch.
        policy: how channels are chosen (criterion, ranking, floors, rounding, ignored layers);
            default ``PruningPolicy()``: ``l1``, per layer.
        plan: channels to remove, as decided by :func:`select_channels` elsewhere (e.g. on rank 0
            under DDP); the amount is then not needed.
        amount: what :func:`select_channels` takes besides the policy:

            - ``ratio``: fraction of channels to remove, in [0, 1): of each layer (per-layer ranking) or of
              all prunable channels (global ranking);
            - or ``target_params``: prune until the student has at most this many parameters;
            - or ``target_macs``: prune until one forward of ``example_input`` costs at most this many MACs;
            - or ``target_latency_ms``: prune until the student runs in at most this many milliseconds, as
              ``latency`` measures them (a :class:`distill.latency.LatencyMeter`: runtime, batch size, threads);
            - ``floors``: channels each group keeps at least, by group name, when pruning runs in steps (from
              ``policy.floors`` of the channels before the first step); default: the policy's floors of the
              current channels;
            - ``data``: batches ``(x, y)`` for data-driven criteria (``taylor``, ``hrank``).
    """
    policy = policy or PruningPolicy()
    measured = None
    if plan is None:
        plan, measured = _select(model, example_input, policy, **amount)
    before_channels = channel_counts(model, example_input, policy.ignored_layers)
    params_before, macs_before = count_params(model), count_macs(model, example_input)
    apply_plan(model, example_input, plan, policy.ignored_layers)
    mark_pruned(model)
    return PruneReport(
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, example_input),
        channels_before=before_channels,
        channels_after={name: before_channels[name] - len(plan.get(name, [])) for name in before_channels},
        latency_ms=measured,
    )
