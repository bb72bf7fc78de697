"""What physical pruning buys: StudentNet pruned 0/25/50/75% by each criterion, measured side by side.

    python benchmarks/pruning_speed.py                  # the table in benchmarks/RESULTS.md
    python benchmarks/pruning_speed.py --repeats 3 --ratios 0.5 --criteria l1   # a quick look

For each pruned student: parameters, MACs (one 1x28x28 image), CPU latency of one forward at batch 1
and 64 (median over interleaved rounds, so machine noise hits every model alike), and the size of its
state_dict on disk. The student is the Fashion-MNIST recipe's StudentNet (10 classes, ``num_pools=3``),
freshly initialised: latency does not depend on the weights. Per-layer ranking is used throughout,
so every criterion removes the same number of channels per layer and differs only in which ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.profile import count_macs, count_params, size_on_disk
from distill.pruning import CRITERIA, PruningPolicy, prune_student
from students import StudentNet


def build(round_to: int, ratio: float, criterion: str, data: list) -> StudentNet:
    torch.manual_seed(0)
    model = StudentNet(num_classes=10, in_chans=1, num_pools=3).eval()
    if ratio > 0:
        policy = PruningPolicy(criterion, round_to=round_to)
        prune_student(model, torch.zeros(1, 1, 28, 28), policy, ratio=ratio, data=data)
    return model


@torch.no_grad()
def latency_ms(models: dict, batch: int, rounds: int, repeats: int) -> dict:
    x = torch.randn(batch, 1, 28, 28)
    times: dict = {key: [] for key in models}
    for model in models.values():  # warm up every model first
        for _ in range(3):
            model(x)
    for _ in range(rounds):
        for key, model in models.items():
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
            times[key].append((time.perf_counter() - start) / repeats * 1000)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 8], help="round_to values to compare")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--repeats", type=int, default=20, help="forwards per model per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 1, 28, 28, generator=generator), torch.randint(0, 10, (64,), generator=generator))] * 4
    models = {("-", 0.0, 1): build(1, 0.0, "l1", data)}
    for criterion in args.criteria:
        for ratio in args.ratios:
            for round_to in args.round_to:
                models[(criterion, ratio, round_to)] = build(round_to, ratio, criterion, data)

    x1 = torch.zeros(1, 1, 28, 28)
    b1 = latency_ms(models, 1, args.rounds, args.repeats)
    b64 = latency_ms(models, 64, args.rounds, max(1, args.repeats // 4))
    base = models[("-", 0.0, 1)]
    base_macs, base_b1, base_b64 = count_macs(base, x1), b1[("-", 0.0, 1)], b64[("-", 0.0, 1)]

    print(f"torch {torch.__version__}, {args.threads} CPU threads, {time.strftime('%Y-%m-%d')}")
    print(
        "| criterion | pruned | round_to | channels | params | MACs | MACs % | batch 1 ms | % | batch 64 ms | % | KB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, model in models.items():
        criterion, ratio, round_to = key
        macs = count_macs(model, x1)
        print(
            f"| {criterion} | {ratio:.0%} | {round_to} | {model.channels} | {count_params(model):,} | {macs:,} | "
            f"{macs / base_macs:.0%} | {b1[key]:.3f} | {b1[key] / base_b1:.0%} | {b64[key]:.2f} | "
            f"{b64[key] / base_b64:.0%} | {size_on_disk(model) / 1024:.0f} |"
        )


if __name__ == "__main__":
    main()
