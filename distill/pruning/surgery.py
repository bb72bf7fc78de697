"""Physical channel pruning of a student: choose channels by importance, remove them with torch-pruning.

torch-pruning's dependency graph (Fang et al. 2023, "DepGraph") finds the coupled layers that must
lose the same channels: a producer conv, its BatchNorm, a depthwise conv, the consumer's input
channels, and the partners of residual additions. This module decides *which* channels go, as a
:class:`~distill.pruning.policy.PruningPolicy` says (per-layer or global ranking, floors, ``round_to``), for a
ratio, a parameter/MAC target or a latency target measured on the runtime (:mod:`distill.pruning.search`),
removes them, and reports the result read from the pruned model.
The stem's input (the image channels) and the classifier's outputs (the classes) are never pruned.

Like torch-pruning's ``MetaPruner``, grouped convolutions, GroupNorms and timm attention (``qkv``, ``num_heads``)
lose the same positions in each of their groups or heads (:func:`channel_slices`). A plan is first applied to
a copy, which must run and rebuild from its checkpoint; otherwise the student is left as it was and the
refusal names the layer (:func:`prune_student`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from torch import nn

from distill.profile import check_runs_on, count_macs, count_params
from distill.pruning.importance import DataDrivenImportance, Importance, producer, resolve_importance
from distill.pruning.policy import PruningPolicy, removal_order
from distill.pruning.search import LatencyMeasure, latency_plan, quietest
from students import build_student, describe_spec, load_weights, mark_pruned, shape_attributes
from students.modes import eval_mode, forget_eval_caches

__all__ = [
    "GRAPH_TIMEOUT_S",
    "PruneReport",
    "UnprunableLayers",
    "apply_plan",
    "attention_heads",
    "channel_counts",
    "channel_groups",
    "channel_slices",
    "check_latency_target",
    "check_target",
    "plan_pruning",
    "prune_student",
    "runnable_plan",
    "select_channels",
]

#: Channels to remove, by the name of the layer that produces each group's channels.
Plan = dict[str, list[int]]
#: Channels each group keeps at least, by group name (``None``: the policy's floors of the current channels).
Floors = Mapping[str, int] | None
#: Seconds torch-pruning may spend tracing a student's dependency graph before the student is refused (on some
#: architectures, e.g. timm's EfficientViT-M0 and ReXNet, torch-pruning 1.6 never finishes). Enforced with SIGALRM,
#: so only in the main thread on Unix; elsewhere a trace has no limit.
GRAPH_TIMEOUT_S = 120.0


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
    #: layers whose channels were kept because pruning them broke the student (``PruningPolicy.ignore_unprunable``)
    kept_layers: tuple[str, ...] = ()

    def __str__(self) -> str:
        kept = (
            f"; kept whole (pruning them broke the student): {', '.join(self.kept_layers)}" if self.kept_layers else ""
        )
        lines = [
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / max(1, self.macs_before):.1%})"
            + (f", {self.latency_ms:.3f} ms measured" if self.latency_ms is not None else "")
            + kept,
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


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The fused ``qkv`` projection of each timm-style attention layer, and its number of heads.

    Pruning keeps every head: each loses the same positions of its head dimension (torch-pruning's
    ``num_heads``), and :func:`_sync_attention` sets the layer's ``head_dim``/``attn_dim`` to match.
    """
    return {m.qkv: m.num_heads for m in model.modules() if _is_attention(m)}


def _is_attention(m: nn.Module) -> bool:
    """A timm-style attention layer: a fused ``qkv`` Linear and an integer ``num_heads``."""
    return isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)


def _sync_attention(model: nn.Module) -> None:
    """Give each timm-style attention layer the head size its pruned ``qkv`` now has."""
    for m in model.modules():
        if _is_attention(m):
            head_dim = m.qkv.out_features // (3 * m.num_heads)
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = head_dim
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = head_dim * m.num_heads


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError(what)`` every ``seconds`` until the block ends (SIGALRM: in the main thread on Unix
    only, elsewhere no limit); a timer already running outside is re-armed with what it had left."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise TimeoutError(what)

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds, seconds)  # repeats: code may swallow one alarm
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
            if outer > 0:
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - started)))


def _dependency_graph(model: nn.Module, example_input: torch.Tensor, frozen: set[nn.Module]) -> tuple[Any, list]:
    """torch-pruning's dependency graph of ``model`` and its groups, or one line saying why there are none."""
    what = f"torch-pruning did not finish tracing {type(model).__name__} within {GRAPH_TIMEOUT_S:g} s"
    try:
        # torch-pruning traces the graph through autograd, in eval mode; a tuple of inputs, or it retries a
        # failed forward without the batch dimension under a bare except (which would swallow the alarm)
        with torch.enable_grad(), eval_mode(model), _time_limit(GRAPH_TIMEOUT_S, what):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example_input,))
            groups = list(graph.get_all_groups(ignored_layers=list(frozen), root_module_types=[nn.Conv2d, nn.Linear]))
    except TimeoutError:
        raise ValueError(
            f"{what} (distill.pruning.surgery.GRAPH_TIMEOUT_S): its graph is not supported; prune another "
            f"architecture, or train this one at its size"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch-pruning fails on foreign graphs with any error
        check_runs_on(model, example_input)  # the input, not the architecture, may be what fails
        raise ValueError(
            f"torch-pruning cannot trace {type(model).__name__}: {type(err).__name__}: {_first_line(err)}. "
            f"Prune another architecture, or train this one at its size"
        ) from None
    finally:
        forget_eval_caches(model)
    return graph, groups


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _rooted_at_heads(graph: Any, group: Any, heads: Mapping[nn.Module, int]) -> Any | None:
    """An attention group re-rooted at the layer that reads the heads (``proj``), as torch-pruning's pruner does.

    Its channels are then numbered like ``proj``'s inputs (heads x head_dim), so removing the same positions
    of every head removes matching rows of q, k and v. Other groups come back as they are; ``None``: an
    attention group without such a layer (left alone).
    """
    if not any(dep.target.module in heads and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
        return group
    for dep, idxs in group:
        if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and graph.is_in_channel_pruning_fn(dep.handler):
            return graph.get_pruning_group(dep.target.module, dep.handler, list(idxs))
    return None


def channel_slices(group: Any, heads: Mapping[nn.Module, int] | None = None) -> int:
    """Equal slices a group's channels come in, each of which must lose the same positions (1: none).

    A grouped convolution (not depthwise) keeps ``groups`` equal slices, a GroupNorm ``num_groups``, an
    attention layer its heads (torch-pruning's ``MetaPruner`` handles them alike).
    """
    slices = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels:
            slices = math.lcm(slices, m.groups)
        elif isinstance(m, nn.GroupNorm):
            slices = math.lcm(slices, m.num_groups)
        elif m in (heads or {}) and dep.handler.__name__ == "prune_out_channels":
            slices = math.lcm(slices, heads[m])
    return slices


def _groups(
    model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, int]]:
    """:func:`channel_groups`, and each group's :func:`channel_slices`."""
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
    heads = attention_heads(model)
    graph, found = _dependency_graph(model, example_input, frozen)
    groups, slices = {}, {}
    for group in found:
        group = _rooted_at_heads(graph, group, heads)
        if group is None:
            continue
        if any(dep.target.module in frozen and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
            continue
        name = _group_name(group, names)
        n, k = len(group[0][1]), channel_slices(group, heads)
        if n % k == 0:
            groups[name], slices[name] = group, k
    return groups, slices


def channel_groups(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[str] = ()) -> dict[str, Any]:
    """The prunable groups of ``model``, by the name of the layer that produces their channels.

    A group is left out when it would change the output channels of the classifier or of a layer
    named in ``ignored_layers``. Attention groups are numbered like the heads they feed (see
    :func:`_rooted_at_heads`).
    """
    return _groups(model, example_input, ignored_layers)[0]


def _group_name(group: Any, names: Mapping[nn.Module, str]) -> str:
    """Name a group after the layer that produces its channels (not a depthwise conv that passes them on)."""
    found = producer(group)
    return names[found[0] if found is not None else group[0].dep.target.module]


def _keep_count(n: int, ratio: float, floor: int, round_to: int) -> int:
    """Channels a group of ``n`` keeps at ``ratio``: at least ``floor``, rounded up to a multiple of ``round_to``
    (the floor too: a rounded count is what the runtime runs fast), at most ``n``."""
    keep = max(floor, math.ceil(n * (1.0 - ratio) - 1e-9))
    return min(n, math.ceil(keep / round_to) * round_to)


def _step(round_to: int, slices: int) -> int:
    """Kept counts are multiples of this: of ``round_to``, and whole positions of every slice."""
    return math.lcm(round_to, slices)


def plan_pruning(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    floors: Mapping[str, int],
    global_ranking: bool = False,
    round_to: int = 1,
    slices: Mapping[str, int] | None = None,
) -> Plan:
    """Which channels to remove from each group at ``ratio``.

    Per-layer ranking removes ``ratio`` of every group's channels; global ranking removes the
    ``ratio`` of all channels with the lowest scores, wherever they are. Either way each group keeps
    at least its floor, and a kept count is rounded up to a multiple of ``round_to`` (and of the group's
    ``slices``, whose positions go together: :func:`removal_order`).
    """
    slices = {name: (slices or {}).get(name, 1) for name in scores}
    order = {name: removal_order(s, slices[name]) for name, s in scores.items()}
    step = {name: _step(round_to, slices[name]) for name in scores}
    keep: dict[str, int] = {}
    if global_ranking:
        units = [  # (mean score of a position, group): a position of k slices removes k channels
            (float(s.float()[order[name][i : i + slices[name]]].mean()), name)
            for name, s in scores.items()
            for i in range(0, len(s), slices[name])
        ]
        left = {name: len(s) for name, s in scores.items()}
        budget = math.floor(ratio * sum(left.values()) + 1e-9)
        for _, name in sorted(units, key=lambda u: u[0]):
            if budget <= 0:
                break
            if slices[name] <= budget and left[name] - slices[name] >= floors[name]:  # never past the ratio
                left[name] -= slices[name]
                budget -= slices[name]
        keep = {
            name: _keep_count(len(scores[name]), 1 - left[name] / len(scores[name]), floors[name], step[name])
            for name in scores
        }
    else:
        keep = {name: _keep_count(len(s), ratio, floors[name], step[name]) for name, s in scores.items()}
    return {name: sorted(order[name][: len(s) - keep[name]]) for name, s in scores.items() if keep[name] < len(s)}


def apply_plan(model: nn.Module, example_input: torch.Tensor, plan: Plan, ignored_layers: Sequence[str] = ()) -> None:
    """Remove the planned channels from ``model`` in place (no checks: see :func:`prune_student`)."""
    groups = channel_groups(model, example_input, ignored_layers)
    for name, idxs in plan.items():
        if idxs:
            groups[name].prune(idxs)
    _sync_attention(model)


def _score(importance: Importance, groups: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    scores, failed = {}, {}
    for name, group in groups.items():
        try:
            s = importance(group)
        except IndexError as err:  # torch-pruning mapped the group's channels past a layer's end
            failed[name] = f"{type(err).__name__}: {_first_line(err)}"
            continue
        if s is None:
            continue
        channels = len(group[0][1])
        if not isinstance(s, torch.Tensor) or s.shape != (channels,):
            got = f"a tensor of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"The importance {getattr(importance, '__name__', type(importance).__name__)} gave {got} "
                             f"for {name!r}, a group of {channels} channels: it must give one score per channel, "
                             f"a tensor of shape ({channels},)")  # fmt: skip
        scores[name] = s.detach().float().cpu()
    if failed:
        raise _refusal(failed, "torch-pruning maps the channels of {} inconsistently")
    return scores


class UnprunableLayers(ValueError):
    """A refusal that names the layers whose pruning breaks the student (``layers``): kept whole, the rest may
    prune (``PruningPolicy.ignore_unprunable`` does so)."""

    def __init__(self, message: str, layers: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.layers = tuple(layers)


def _refusal(found: Mapping[str, str], problem: str) -> ValueError:
    """One line: ``problem`` naming the layers of ``found`` (name: reason), the first reason, and what to try."""
    if "" in found:  # no single layer to blame
        return ValueError(f"{problem.format('it')} ({found['']}); the student was left unchanged. Prune another "
                          "architecture, or prune less")  # fmt: skip
    (first, reason), names = next(iter(found.items())), ", ".join(map(repr, found))
    which = f"layer {first!r}" if len(found) == 1 else f"{len(found)} layers ({first!r} first)"
    return UnprunableLayers(
        f"{problem.format(which)} ({reason}); the student was left unchanged. Keep their channels and prune the "
        f"rest (ignored_layers=[{names}], or ignore_unprunable to keep every such layer), or prune another "
        f"architecture",
        list(found),
    )


_T = TypeVar("_T")


def _keeping_unprunable(policy: PruningPolicy, attempt: Callable[[PruningPolicy], _T]) -> tuple[_T, PruningPolicy]:
    """``attempt(policy)``, and the policy it ran with. With ``policy.ignore_unprunable``, a refusal naming layers
    (:class:`UnprunableLayers`) adds them to ``ignored_layers`` and the attempt runs again until it is not refused
    (each adds a layer: it ends, at the latest when no layer is left to prune)."""
    given = policy.ignored_layers
    while True:
        try:
            return attempt(policy), policy
        except UnprunableLayers as refusal:
            new = [name for name in refusal.layers if name not in policy.ignored_layers]
            if not policy.ignore_unprunable or not new:
                raise
            policy = policy.keeping(new)
        except ValueError as err:  # e.g. a target out of reach: say that layers were kept, which may be why
            kept = _kept_note(given, policy)
            if not kept:
                raise
            raise ValueError(f"{err}{kept}") from None


def _kept_note(given: Sequence[str], policy: PruningPolicy) -> str:
    """`` (ignore_unprunable kept these layers whole: ...)``: those ``policy`` ignores beyond ``given``; or ``""``."""
    kept = [name for name in policy.ignored_layers if name not in given]
    more = f", ... ({len(kept)} in all)" if len(kept) > 3 else ""
    return f" (ignore_unprunable kept these layers whole: {', '.join(kept[:3])}{more})" if kept else ""


def channel_counts(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[str] = ()) -> dict[str, int]:
    """The channels of each prunable group of ``model``, by group name (see :func:`channel_groups`)."""
    return {name: len(group[0][1]) for name, group in channel_groups(model, example_input, ignored_layers).items()}


def _size(model: nn.Module, example_input: torch.Tensor, target_params: int | None) -> int:
    """Parameters when the target is a parameter count, else MACs per forward of ``example_input``."""
    return count_params(model) if target_params is not None else count_macs(model, example_input)


def _scored(
    model: nn.Module, example_input: torch.Tensor, criterion: Importance, policy: PruningPolicy, floors: Floors
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, int]]:
    """Each group's channel scores, its floor (``floors``, or the policy's of its current channels), its slices."""
    groups, slices = _groups(model, example_input, policy.ignored_layers)
    scores = _score(criterion, groups)
    if not groups and policy.ignored_layers:
        raise ValueError(f"no layer is left to prune: ignored_layers={list(policy.ignored_layers)} covers them all")
    if not groups:
        raise ValueError("the model has no layer whose channels can be pruned")
    if not scores:
        raise ValueError("the criterion scored no layer (e.g. bn_scale on a model without BatchNorm)")
    own = policy.floors({name: len(s) for name, s in scores.items()})
    return scores, {name: (floors or {}).get(name, own[name]) for name in scores}, {n: slices[n] for n in scores}


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


def runnable_plan(
    model: nn.Module, example_input: torch.Tensor, policy: PruningPolicy | None = None, **amount: Any
) -> tuple[Plan, PruningPolicy]:
    """:func:`select_channels` (``amount`` as it takes), and the plan checked on a copy of ``model`` (it runs and
    rebuilds from its checkpoint); with the policy it ran with, which ``ignore_unprunable`` may have made keep
    more layers. Where one process decides for several (DDP's rank 0), they all apply it with that policy."""
    (plan, _), policy = _runnable(model, example_input, policy or PruningPolicy(), amount)
    return plan, policy


def _runnable(
    model: nn.Module, example_input: torch.Tensor, policy: PruningPolicy, amount: dict[str, Any]
) -> tuple[tuple[Plan, float | None], PruningPolicy]:
    """:func:`runnable_plan`, with the milliseconds a latency search measured the plan at."""
    if policy.ignore_unprunable and amount.get("data") is not None:  # each attempt's criterion reads the same ones
        amount = {**amount, "data": list(itertools.islice(amount["data"], policy.num_batches))}

    def attempt(policy: PruningPolicy) -> tuple[Plan, float | None]:
        plan, measured = _select(model, example_input, policy, **amount)
        _check_plan(model, example_input, plan, policy.ignored_layers)
        return plan, measured

    return _keeping_unprunable(policy, attempt)


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
    scores, floors, slices = _scored(model, example_input, criterion, policy, floors)

    def make(r: float) -> Plan:
        return plan_pruning(scores, r, floors, policy.global_ranking, policy.round_to, slices)

    if ratio is not None:
        return make(ratio), None
    if target_latency_ms is not None:
        # The search times copies down to every layer's floor: a layer whose pruning breaks the student is named
        # here, before anything is timed (ignore_unprunable keeps it), not by the runtime's exporter mid-search.
        _check_plan(model, example_input, make(1.0 - 1e-9), policy.ignored_layers)

        def apply(trial: nn.Module, plan: Plan) -> None:
            apply_plan(trial, example_input, plan, policy.ignored_layers)

        return latency_plan(model, scores, floors, policy.round_to, target_latency_ms, latency, apply, slices=slices)

    _check_smallest(model, example_input, make, policy.ignored_layers, target_params, target_macs)
    return _bisect(model, example_input, make, policy.ignored_layers, target_params, target), None


def _bisect(
    model: nn.Module,
    example_input: torch.Tensor,
    make: Callable[[float], Plan],
    ignored_layers: Sequence[str],
    target_params: int | None,
    target: int,
) -> Plan:
    """The plan at the least ratio whose pruned copy has at most ``target`` parameters (or MACs)."""
    sizes: dict[str, int] = {}  # by plan: with round_to, many ratios give the same layout

    def cost(r: float) -> int:
        plan = make(r)
        key = repr(sorted(plan.items()))
        if key not in sizes:
            trial = copy.deepcopy(model)
            try:
                apply_plan(trial, example_input, plan, ignored_layers)
                sizes[key] = _size(trial, example_input, target_params)
            except Exception:  # noqa: BLE001 - a layout that does not run: prune less (prune_student refuses it
                sizes[key] = 0  # if the target needs it)
        return sizes[key]

    lo, hi = 0.0, 1.0 - 1e-9  # cost(lo) > target >= cost(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return make(hi)


def check_target(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None = None,
    *,
    target_params: int | None = None,
    target_macs: int | None = None,
    floors: Floors = None,
) -> PruningPolicy:
    """Refuse a size target that pruning ``model`` cannot reach without breaking a floor; the policy that reaches
    it (with ``ignore_unprunable``, the layers whose pruning breaks the student added to its ``ignored_layers``).

    Cheap (one pruned copy, no data), so jobs check their final target before they start.
    """

    def attempt(policy: PruningPolicy) -> None:
        scores, own, slices = _scored(model, example_input, resolve_importance("l1"), policy, floors)  # any: size

        def make(r: float) -> Plan:
            return plan_pruning(scores, r, own, policy.global_ranking, policy.round_to, slices)

        _check_smallest(model, example_input, make, policy.ignored_layers, target_params, target_macs)

    return _keeping_unprunable(policy or PruningPolicy(), attempt)[1]


def check_latency_target(
    model: nn.Module,
    example_input: torch.Tensor,
    policy: PruningPolicy | None,
    target_latency_ms: float | None,
    latency: LatencyMeasure,
    floors: Floors = None,
    fraction: float | None = None,
) -> tuple[float, float]:
    """Refuse a latency target that pruning ``model`` cannot reach; the student's and its smallest layout's ms.

    Both are timed side by side by ``latency``: the student, and a copy with every prunable layer at its floor.
    A ``fraction`` of the student's time (with ``target_latency_ms=None``) is a target of that timing's, so a
    busy moment cannot put it above the student; and of the least of three such timings, since a busy moment
    only adds time (one timing on a shared 2-core CI machine read the student 33% slow: a target of 0.75 of it
    was the student's own time, and the search had nothing to prune).
    """
    if (target_latency_ms is None) == (fraction is None):
        raise ValueError(f"give target_latency_ms or fraction, got {target_latency_ms} and {fraction}")

    def attempt(policy: PruningPolicy) -> nn.Module:
        scores, own, slices = _scored(model, example_input, resolve_importance("l1"), policy, floors)  # any: size
        plan = plan_pruning(scores, 1.0 - 1e-9, own, False, policy.round_to, slices)
        return _check_plan(model, example_input, plan, policy.ignored_layers)

    policy = policy or PruningPolicy()
    smallest, kept = _keeping_unprunable(policy, attempt)
    ms = quietest(latency, {"student": model, "smallest": smallest}, calls=1 if fraction is None else 3)
    where = getattr(latency, "describe", lambda: "the runtime")()
    if fraction is not None:
        target_latency_ms = round(fraction * ms["student"], 3)
    if target_latency_ms >= ms["student"]:
        raise ValueError(
            f"target {target_latency_ms:.3f} ms is not below the student's {ms['student']:.3f} ms ({where}): "
            f"nothing to prune"
        )
    if ms["smallest"] > target_latency_ms:
        raise ValueError(
            f"target {target_latency_ms:.3f} ms cannot be met: with every prunable layer at its floor the student "
            f"still runs in {ms['smallest']:.3f} ms ({where}). Lower min_fraction, prune more layers (ignored_layers), "
            f"or raise the target.{_kept_note(policy.ignored_layers, kept)}"
        )
    return ms["student"], ms["smallest"]


def _check_smallest(
    model: nn.Module,
    example_input: torch.Tensor,
    make: Callable[[float], Plan],
    ignored_layers: Sequence[str],
    target_params: int | None,
    target_macs: int | None,
) -> None:
    """Refuse a size target that the smallest layout ``make`` gives (every layer at its floor) does not meet."""
    target = target_params if target_params is not None else target_macs
    trial = copy.deepcopy(model)
    try:
        apply_plan(trial, example_input, make(1.0 - 1e-9), ignored_layers)
        with torch.no_grad(), eval_mode(trial):
            trial(example_input)
        smallest = _size(trial, example_input, target_params)
    except Exception:  # noqa: BLE001 - the smallest layout does not run (GhostNet's coupled groups empty a layer):
        plan = _bisect(model, example_input, make, ignored_layers, target_params, target)  # check the target's
        smallest = _size(_check_plan(model, example_input, plan, ignored_layers), example_input, target_params)
    if smallest > target:
        unit = "parameters" if target_params is not None else "MACs"
        raise ValueError(
            f"target {target:,} {unit} cannot be met without emptying a layer: with every prunable layer at its "
            f"floor the student still has {smallest:,}. Lower min_channels/min_fraction (or round_to), prune more "
            f"layers, or raise the target."
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
        plan: channels to remove, as decided by :func:`runnable_plan` elsewhere (e.g. on rank 0 under DDP, with
            the policy it gives); the amount is then not needed.
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
    _check_is_a_student(model)
    asked = policy = policy or PruningPolicy()
    measured = None
    if plan is None:
        (plan, measured), policy = _runnable(model, example_input, policy, amount)  # checked on a copy
    else:
        _check_plan(model, example_input, plan, policy.ignored_layers)  # a refusal leaves the model as it was
    before_channels = channel_counts(model, example_input, policy.ignored_layers)
    params_before, macs_before = count_params(model), count_macs(model, example_input)
    _prune(model, example_input, plan, policy.ignored_layers)
    after = channel_counts(model, example_input, policy.ignored_layers)
    return PruneReport(
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, example_input),
        channels_before=before_channels,
        channels_after={name: after.get(name, _out_channels(model, name)) for name in before_channels},  # read from
        latency_ms=measured,  # the model: coupled groups may lose more than their plan says, or merge
        kept_layers=tuple(name for name in policy.ignored_layers if name not in asked.ignored_layers),
    )


def _check_is_a_student(model: nn.Module) -> None:
    """Refuse a module that holds the student (a ``DistillModule``) instead of being it: pruned whole, a timm student
    inside kept the spec of its unpruned layout, so its checkpoints no longer loaded."""
    if isinstance(getattr(model, "student", None), nn.Module):
        raise ValueError(f"{type(model).__name__} holds the student to prune: prune that module, "
                         f"prune_student(model.student, ...), not the one holding it")  # fmt: skip


def _out_channels(model: nn.Module, name: str) -> int:
    """The output channels of layer ``name`` (a group's producer)."""
    layer = model.get_submodule(name)
    return layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features


def _prune(model: nn.Module, example_input: torch.Tensor, plan: Plan, ignored_layers: Sequence[str]) -> None:
    """Apply ``plan`` and record in the model's spec what a checkpoint needs to rebuild the pruned layout."""
    before = shape_attributes(model)
    apply_plan(model, example_input, plan, ignored_layers)
    mark_pruned(model, before)


def _check_plan(model: nn.Module, example_input: torch.Tensor, plan: Plan, ignored_layers: Sequence[str]) -> nn.Module:
    """Prune a copy of ``model`` by ``plan`` and refuse the plan, in one line, unless the copy still runs (same
    output shape) and rebuilds from its checkpoint (spec and state_dict) to the same outputs; the copy."""
    with torch.no_grad(), eval_mode(model):
        expected = model(example_input).shape
    trial = copy.deepcopy(model).cpu()  # on the CPU: no GPU memory beside training
    example_input = example_input.cpu()
    try:
        _prune(trial, example_input, plan, ignored_layers)
        with torch.no_grad(), eval_mode(trial):
            got = trial(example_input)
        if got.shape != expected:
            raise ValueError(f"the output changed shape, {tuple(expected)} -> {tuple(got.shape)}")
    except Exception as err:  # noqa: BLE001 - torch-pruning and the model fail with any error; find the layers
        found = _culprits(model, example_input, plan, ignored_layers, expected) or {"": _first_line(err)}
        raise _refusal(found, "pruning {} breaks the student") from None
    spec = getattr(trial, "model_spec", None)
    if spec is not None:
        try:
            state = trial.state_dict()
            rebuilt = load_weights(build_student(spec, state), state, "the pruned student", describe_spec(spec))
            with torch.no_grad(), eval_mode(rebuilt), eval_mode(trial):  # close, not equal: the student may
                got, expected = rebuilt(example_input), trial(example_input)  # be channels_last
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                raise ValueError("its outputs differ from the pruned student's")
        except Exception as err:  # noqa: BLE001 - any failure to rebuild is the same refusal
            raise ValueError(
                f"the pruned student could not be rebuilt from its checkpoint ({_first_line(err)}), so it could not "
                f"be saved and loaded again; the student was left unchanged. Prune another architecture"
            ) from None
    return trial


def _culprits(
    model: nn.Module, example_input: torch.Tensor, plan: Plan, ignored_layers: Sequence[str], expected: torch.Size
) -> dict[str, str]:
    """The groups of ``plan`` whose pruning breaks ``model``, and why: each applied in plan order on a copy with
    the groups before it that did not break it (one more copy per group that does)."""
    found: dict[str, str] = {}
    fine: list[str] = []
    trial = None
    for name, idxs in plan.items():
        if trial is None:
            trial = copy.deepcopy(model).cpu()
            groups = channel_groups(trial, example_input, ignored_layers)
            for done in fine:
                groups[done].prune(plan[done])
        try:
            groups[name].prune(idxs)
            _sync_attention(trial)
            with torch.no_grad(), eval_mode(trial):
                got = trial(example_input)
            if got.shape != expected:
                raise ValueError(f"the output changed shape, {tuple(expected)} -> {tuple(got.shape)}")
            fine.append(name)
        except Exception as err:  # noqa: BLE001
            found[name] = f"{type(err).__name__}: {_first_line(err)}"
            trial = None
    return found
