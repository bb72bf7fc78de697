"""How close the latency search lands to its target: searches of one student, each re-timed against its start.

    python benchmarks/latency_search.py                            # StudentNet 1.0 to 0.75 of its ms, 3 searches
    python benchmarks/latency_search.py --checkpoint runs/quickstart/student.ckpt --fraction 0.6
    python benchmarks/latency_search.py --modes fixed relative     # the two ways to time a fraction, in turn

The student (``--checkpoint``, else a StudentNet of ``--width`` with seeded random weights) is timed three times
beside its smallest layout and the target is ``--fraction`` of its least reading, as ``distill prune-distill``
derives a fractional target (each timing ``--rounds`` rounds, ``LatencyMeter``'s 15 by default). Each search
(``prune_student`` to that target: ``l1``, ``min_fraction`` 0.1, ``round_to`` 8, the quickstart's policy)
reports the timings it took, its seconds, the milliseconds it measured and the layout (with the student's
milliseconds at each timing); then the pruned student is timed beside its start three times, and the least ratio
of the two is what it runs at as a fraction of the start (the target's fraction is what it should be: a lower
one overshot).

``--modes``: how the search reads the student against the target. ``relative`` (prune-distill's way) times every
candidate beside the start and scales by the start's reading (:func:`distill.latency.relative_to`); ``fixed``
compares raw milliseconds with the target fixed by the check. Several modes take turns, search by search, and a
second table sums each up.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from distill.latency import LatencyMeter, relative_to
from distill.profile import count_params
from distill.pruning import CHANNEL_MULTIPLE, PruningPolicy, check_latency_target, prune_student
from distill.report import markdown_table
from students import StudentNet, load_student

POLICY = PruningPolicy("l1", min_fraction=0.1, round_to=CHANNEL_MULTIPLE)
X1 = torch.zeros(1, 1, 28, 28)


def failed(rows: list[list]) -> str:
    """`` (+N failed)`` for the searches of ``rows`` that gave up, else nothing."""
    n = sum(r[8] == "failed" for r in rows)
    return f" (+{n} failed)" if n else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a 1x28x28 student saved by the project (default: a random StudentNet)")
    parser.add_argument("--width", type=float, default=1.0, help="width_mult of the random StudentNet")
    parser.add_argument("--fraction", type=float, default=0.75, help="the target, a fraction of the start's ms")
    parser.add_argument("--searches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=LatencyMeter.rounds, help="timing rounds of each call")
    parser.add_argument("--modes", nargs="+", choices=("relative", "fixed"), default=["relative"],
                        help="each search's way to read the student (several: in turn)")  # fmt: skip
    args = parser.parse_args()
    if not 0 < args.fraction < 1 or args.searches < 1 or args.rounds < 1:
        parser.error(f"need 0 < --fraction < 1, --searches >= 1 and --rounds >= 1, got {args.fraction}, "
                     f"{args.searches} and {args.rounds}")  # fmt: skip
    torch.manual_seed(args.seed)
    meter = LatencyMeter((1, 28, 28), rounds=args.rounds)
    try:
        start = (load_student(args.checkpoint) if args.checkpoint else
                 StudentNet(num_classes=10, in_chans=1, num_pools=3, width_mult=args.width)).eval()  # fmt: skip
        start_ms, _ = check_latency_target(start, X1, POLICY, None, meter, fraction=args.fraction)
    except (OSError, ValueError) as err:
        parser.error(str(err).splitlines()[0])
    target = round(args.fraction * start_ms, 3)
    print(f"start {start_ms:.3f} ms ({meter.describe()}), target {target:.3f} ms ({args.fraction} of it)\n")
    rows, calls = [], []

    def counted(models: dict) -> dict[str, float]:  # the meter, keeping each timing's size and student's ms
        timed = meter(models)
        calls.append((len(models), timed.get("current", math.nan)))
        return timed

    for k in range(args.searches):
        for mode in args.modes:
            calls.clear()
            model, began = copy.deepcopy(start), time.perf_counter()
            measure = relative_to(counted, start, start_ms) if mode == "relative" else counted
            try:
                report = prune_student(model, X1, POLICY, target_latency_ms=target, latency=measure)
            except ValueError as err:  # the search gave up: a result too (the model is left as it was)
                print(f"search {k} ({mode}) failed: {err}", flush=True)
                report = None
            seconds, path = time.perf_counter() - began, " ".join(f"{now:.3f}" for _, now in calls)
            if report is None:
                found = ("failed", "", "failed")
            else:
                ratio = min(
                    t["pruned"] / t["start"] for t in (meter({"start": start, "pruned": model}) for _ in range(3))
                )
                found = (f"{report.latency_ms:.3f}", f"{report.latency_ms / target:.2f}", f"{ratio:.3f}")
            rows.append([k, mode, len(calls), sum(n for n, _ in calls), path, f"{seconds:.0f}", *found,
                         f"{count_params(model):,}", str(model.channels)])  # fmt: skip
    header = ["search", "mode", "timings", "models timed", "ms at each timing", "s", "search's ms", "/ target",
              "re-timed / start", "params", "channels"]  # fmt: skip
    print(markdown_table(header, "rlrrlrrrrrl", rows))
    summary = []
    for mode in args.modes:
        mine = [r for r in rows if r[1] == mode]
        ratios = sorted(float(r[8]) for r in mine if r[8] != "failed")
        if not ratios:
            summary.append([mode, len(mine), "all failed", "", "", "", ""])
            continue
        distance = statistics.mean(abs(x - args.fraction) for x in ratios)
        landed = " ".join(f"{x:.3f}" for x in ratios) + failed(mine)
        summary.append([mode, len(mine), landed, f"{statistics.median(ratios):.3f}", f"{distance:.3f}",
                        f"{statistics.mean(r[2] for r in mine):.1f}",
                        f"{statistics.mean(float(r[5]) for r in mine):.0f}"])  # fmt: skip
    header = ["mode", "searches", "re-timed / start, sorted", "median", f"mean distance from {args.fraction:g}",
              "timings per search", "s per search"]  # fmt: skip
    print()
    print(markdown_table(header, "lrlrrrr", summary))


if __name__ == "__main__":
    main()
