"""Latency-aware channel selection: which layers lose channels, chosen by measured latency on the runtime.

Parameters and MACs do not say what a layer costs where the student runs: in ONNX Runtime on a 2-core
CPU, StudentNet's stem (113k MACs per image) took 190 us of a batch of 64, nearly the 239 us of a
256-channel pointwise layer with 5x its MACs, and channel counts that are not multiples of 4 run 3.5x
slower (RESULTS.md, issue 15).
So, like NetAdapt (Yang et al., ECCV 2018), the search times real candidates of the current layout on the
target runtime, and, like HALP (Shen et al., NeurIPS 2022), it spends a latency budget on the channels
whose importance per millisecond saved is lowest:

1. time the current layout and, for each group, the layout with that group cut by a probe (a quarter of
   its channels, in multiples of ``round_to``), side by side: each group's latency saved per channel;
2. rank every chunk of ``round_to`` channels, lowest-importance first within its group, by the fraction of
   its group's importance it holds divided by the latency it saves, and remove chunks in that order, none
   past its group's probe (the saving was measured that far), until the predicted saving reaches the
   step's aim: half the gap to the target, but at least 5% of the target and at most the gap (NetAdapt's
   small steps). The gap is from the least reading of the student so far (a busy moment only adds time).
   Aiming at the whole gap in one step overshot to 0.32-0.55 of the start for a 0.75 target (RESULTS.md,
   "The latency search lands near its target"): one busy timing inflates the gap, and one noisy probe
   that reads a layer almost free sent the layer to its floor. The last two cuts (of ``max_steps`` timings)
   aim at the whole gap from their own reading and 2.5% of the target past it, past the probes: a run in a long
   slow phase ends past its target rather than failing (aimed at the target itself, two readings 1% over it in
   a row failed a search);
3. time the result; repeat from 1 at the new layout until it runs at or under the target (a round in
   which no probe runs faster is measured once more before the search gives up: timings are noisy).

Importance comes from the policy's criterion, as a fraction of its group's total (a narrow layer's
channels weigh more than a wide one's). Groups whose probe does not run faster are left alone, so the
search never pays accuracy for nothing, and the layout returned was measured at or under the target.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from distill.pruning.policy import removal_order

__all__ = ["LatencyMeasure", "latency_plan", "quietest"]

#: Times named models side by side: ``{name: module} -> {name: milliseconds}`` (:class:`distill.latency.LatencyMeter`).
LatencyMeasure = Callable[[Mapping[str, nn.Module]], Mapping[str, float]]
#: A gap within this fraction of the target is closed in one step (a smaller one by halves would take many).
CLOSE = 0.05
#: The last cuts of a search (each measured) aim at the whole gap from the current reading, past the probes: when
#: the machine stays slow for minutes, the careful steps would cut a chunk at a time until ``max_steps`` ended the
#: run (seen in CI: 12 steps, a width-0.5 StudentNet read at 1.239 ms for a 0.748 target).
HURRY = 2
#: Channels to remove, by group name (as :func:`distill.pruning.surgery.plan_pruning` returns).
Plan = dict[str, list[int]]


def quietest(measure: LatencyMeasure, models: Mapping[str, nn.Module], calls: int = 3) -> dict[str, float]:
    """Each model's least milliseconds over ``calls`` side-by-side timings by ``measure``: a busy moment only adds
    time, so this is the figure to derive a target from (one timing on a shared 2-core CI machine read 33% high)."""
    timings = [measure(models) for _ in range(calls)]
    return {name: min(t[name] for t in timings) for name in models}


def latency_plan(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    floors: Mapping[str, int],
    round_to: int,
    target_ms: float,
    measure: LatencyMeasure,
    apply: Callable[[nn.Module, Plan], None],
    probe: float = 0.25,
    aim: float = 0.5,
    max_steps: int = 12,
    slices: Mapping[str, int] | None = None,
) -> tuple[Plan, float]:
    """The channels to remove so that ``model`` runs in at most ``target_ms``, and its measured milliseconds.

    Args:
        model: the student (left untouched: candidates are pruned copies).
        scores: each group's channel scores (low: pruned first).
        floors: channels each group keeps at least.
        round_to: kept channel counts are multiples of this (or the group's full count).
        target_ms: the latency to reach, in ``measure``'s milliseconds.
        measure: times named models side by side.
        apply: removes a plan's channels from a model in place.
        probe: fraction of a group's channels cut to measure what the group costs.
        aim: fraction of the remaining gap to the target each step sets out to save (at least 5% of the
            target, and at most the gap; 1 aims at the whole gap every step).
        max_steps: measured steps before giving up.
        slices: each group's equal slices that lose the same positions (a grouped conv, attention heads;
            :func:`distill.pruning.surgery.channel_slices`); default 1.

    Raises:
        ValueError: when no group's channels make the student faster any more, or after ``max_steps``.
    """
    n = {g: len(s) for g, s in scores.items()}
    step = {g: math.lcm(round_to, (slices or {}).get(g, 1)) for g in scores}
    order = {g: removal_order(s, (slices or {}).get(g, 1)) for g, s in scores.items()}
    share = {}  # each channel's share of its group's importance, in the order channels are removed
    for g, s in scores.items():
        positive = s.float().clamp_min(0)
        total = float(positive.sum())
        share[g] = [float(positive[i]) / total if total > 0 else 1.0 / n[g] for i in order[g]]
    lowest = {g: min(n[g], max(1, math.ceil(floors[g] / step[g])) * step[g]) for g in n}
    keep = dict(n)

    def smaller(g: str, k: int) -> int:
        """The next kept count below ``k`` (a multiple of the group's step), or ``k`` when at the floor."""
        below = ((k - 1) // step[g]) * step[g]
        return below if below >= lowest[g] and below > 0 else k

    def plan_for(counts: Mapping[str, int]) -> Plan:
        return {g: sorted(order[g][: n[g] - counts[g]]) for g in n if counts[g] < n[g]}

    def build(counts: Mapping[str, int]) -> nn.Module:
        trial = copy.deepcopy(model)
        apply(trial, plan_for(counts))
        return trial

    now, last, retried = math.inf, math.inf, False
    for taken in range(max_steps):
        hurry = taken >= max_steps - 1 - HURRY  # a long slow phase: end as the whole-gap search did, past the target
        probes = {}
        for g, k in keep.items():
            cut = k
            while cut > lowest[g] and k - cut < max(step[g], probe * k) and smaller(g, cut) < cut:
                cut = smaller(g, cut)
            if cut < k:
                probes[g] = cut
        timed = measure({"current": build(keep)} | {g: build(keep | {g: cut}) for g, cut in probes.items()})
        now = timed["current"]
        if now <= target_ms:
            return plan_for(keep), now
        if taken == max_steps - 1:  # a cut now would never be measured
            break
        per_channel = {g: (now - timed[g]) / (keep[g] - cut) for g, cut in probes.items() if timed[g] < now}
        if not per_channel and not retried:  # one noisy round can hide every saving: measure once more
            retried = True
            continue
        if not per_channel:
            raise ValueError(
                f"the student runs in {now:.3f} ms and removing channels from no layer makes it faster: "
                f"{target_ms:.3f} ms cannot be reached (lower the floors, prune more layers, or raise the target)"
            )
        chunks = []  # (importance per ms saved, group, kept count after the chunk), cheapest first per group
        for g, rate in per_channel.items():  # no further than the probe: the saving was measured that far
            k, position = keep[g], n[g] - keep[g]
            while (below := smaller(g, k)) < k and (hurry or below >= probes[g]):
                lost = sum(share[g][position : position + k - below])
                chunks.append((lost / (rate * (k - below)), g, below))
                position, k = position + k - below, below
        chunks.sort(key=lambda c: c[0])
        last = min(now, last)  # a busy moment only adds time, and losing channels did not slow the student down
        gap = (now if hurry else last) - target_ms
        need = gap + CLOSE / 2 * target_ms if hurry else min(gap, max(aim * gap, CLOSE * target_ms))
        saved = 0.0
        for _, g, below in chunks:  # within a group chunks are sorted already: shares only grow
            if below < keep[g]:
                saved += per_channel[g] * (keep[g] - below)
                keep[g] = below
            if saved >= need:
                break
        retried = False
    raise ValueError(
        f"the latency search stopped after {max_steps} measured steps at {now:.3f} ms, above the target "
        f"{target_ms:.3f} ms (the runtime's timings may be too noisy at this size; raise the target)"
    )
