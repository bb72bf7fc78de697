"""Prune-distill to a latency target against the whole width_mult family, on measured latency (issue 15).

    distill quickstart                                   # runs/quickstart: the teacher and the KD recipe
    python benchmarks/latency_front.py --fraction 0.6    # 3 seeds, about 25 minutes on a 2-core CPU
    python benchmarks/latency_front.py --table runs/latency_front   # the table again, from the runs
    python benchmarks/latency_front.py --fraction 0.6 --importance l1 taylor --out runs/latency_front_criteria
    python benchmarks/latency_front.py --student mobilenetv3_small_075 --target-model mobilenetv3_small_050 \
        --fraction 1.0 --baselines mobilenetv3_small_050 mobilenetv3_small_075 --seeds 0 --out runs/latency_front_mnv3

For each seed, one ``distill prune-distill`` run on the quickstart's KD recipe (teacher logits cached):
StudentNet 1.0 distilled for ``--start-epochs``, pruned to ``--fraction`` of its latency in ONNX Runtime
(CPU, batch 64, this machine's threads) in 2 geometric rounds of 1 epoch by the latency search (all eight
layers, ``round_to`` 8), 1 final epoch; its layout retrained from scratch for the same total epochs; and the
width_mult family (0.25, 0.375, 0.5, 0.75, 1.0), each distilled from scratch for the same total epochs. With
``--student`` a timm model replaces StudentNet, pruned to ``--fraction`` of ``--target-model``'s ms, beside
the timm ``--baselines`` (its family of smaller variants). Then
every final student of every seed is timed side by side in one call, and the table gives each student's
latency and test accuracy (mean ± std over seeds) and the verdict at the pruned student's latency.

With several ``--importance`` criteria, each seed is pruned once per criterion, each run distilling its own
start with that seed, and the width family is trained once, in the first criterion's run (``seed<N>``; the
others in ``seed<N>_<criterion>``). A criterion other than ``l1`` is named in the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from distill.latency import LatencyMeter
from distill.prune_distill import prune_distill
from distill.pruning import CRITERIA
from distill.report import markdown_table
from distill.rundir import RunState
from students import StudentNet, create_timm_model, load_student

WIDTHS = [0.25, 0.375, 0.5, 0.75, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="runs/quickstart/student.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/latency_front"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.75, help="the target, as a fraction of width 1.0's ms")
    parser.add_argument("--start-epochs", type=int, default=3)
    parser.add_argument("--train-fraction", type=float, default=0.5, help="limit_train_batches of every phase")
    parser.add_argument("--runtime", default="onnxruntime", help="where latency is measured (see distill.latency)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per timed batch")
    parser.add_argument("--student", help="a timm student instead of StudentNet 1.0")
    parser.add_argument("--target-model", help="the timm model whose ms times --fraction is the target")
    parser.add_argument("--baselines", nargs="+", default=WIDTHS, help="widths, or timm names with --student")
    parser.add_argument("--importance", nargs="+", default=["l1"], choices=sorted(CRITERIA),
                        help="pruning criteria, compared side by side")  # fmt: skip
    parser.add_argument("--table", type=Path, help="only print the table of an earlier run folder")
    args = parser.parse_args()
    args.importance = list(dict.fromkeys(args.importance))
    if args.table is not None and not (args.table / "target.json").is_file():
        parser.error(f"{args.table} holds no latency_front run (no target.json): give the --out of one")
    out = args.table or args.out
    if args.table is None:
        run_all(args)
    print(table(out, LatencyMeter((1, 28, 28), args.runtime, args.batch_size, rounds=21)))


def run_all(args: argparse.Namespace) -> None:
    meter = LatencyMeter((1, 28, 28), args.runtime, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / "target.json"
    if not record.is_file():  # measured once: with a timm student, every seed prunes to the same milliseconds
        model = StudentNet(num_classes=10, in_chans=1, num_pools=3)
        if args.target_model:
            model = create_timm_model(args.target_model, num_classes=10, in_chans=1)
        ms = meter({"w1": model})["w1"]
        record.write_text(json.dumps({"width_1_ms": ms, "target_ms": round(args.fraction * ms, 3),
                                      "measured on": meter.describe()}))  # fmt: skip
    target = json.loads(record.read_text())["target_ms"]
    overrides = {"trainer": {"limit_train_batches": args.train_fraction}}
    baselines = [float(b) for b in args.baselines] if not args.student else list(args.baselines)
    recipe = args.recipe
    if args.student:  # the recipe with a timm student in StudentNet's place (overrides would merge the two)
        cfg = yaml.safe_load(Path(recipe).read_text())
        cfg["model"]["student"] = {"class_path": "students.create_timm_model", "init_args": {"name": args.student}}
        recipe = str(args.out / "recipe.yaml")
        Path(recipe).write_text(yaml.safe_dump(cfg, sort_keys=False))
    # StudentNet 1.0 is the start: a fraction of its time, timed beside it by each search (a slow phase of the
    # machine moves both alike); else the milliseconds measured once
    relative = not args.student and not args.target_model
    goal = {"target_latency": args.fraction} if relative else {"target_latency_ms": target}
    for seed in args.seeds:
        for k, importance in enumerate(args.importance):  # the family once per seed, in the first criterion's run
            folder = args.out / (f"seed{seed}" if k == 0 else f"seed{seed}_{importance}")
            prune_distill(recipe=recipe, **goal, initial_epochs=args.start_epochs, rounds=2,
                          epochs_per_round=1, final_epochs=1, retrain_from_scratch=True, importance=importance,
                          baseline=k == 0, baselines=baselines if k == 0 else None, export_onnx=False,
                          overrides=overrides, cache_teacher_logits=False, seed=seed, latency_runtime=args.runtime,
                          latency_batch_size=args.batch_size, run_dir=str(folder))  # fmt: skip


def table(out: Path, meter: LatencyMeter) -> str:
    """Every seed's final students timed side by side, and their accuracies over seeds."""
    runs = sorted(out.glob("seed*/state.json"))
    states = [RunState(p.parent, "prune-distill").state for p in runs]  # its paths, where the run folder is now
    criteria = {state["settings"].get("importance", "l1") for state in states}
    students: dict[str, list[dict]] = {}
    for state in states:
        rows = state["phases"]
        last = max(r["round"] for r in rows.values() if r["phase"] == "round")
        by = f", {state['settings'].get('importance', 'l1')}" if criteria != {"l1"} else ""
        for r in rows.values():
            if r["phase"] == "final" or (r["phase"] == "round" and r["round"] == last):
                students.setdefault(f"pruned ({r['phase']}){by}", []).append(r)
            elif r["phase"] in ("scratch", "baseline"):
                name = f"pruned{by}, its layout from scratch" if r["phase"] == "scratch" else r["student"].split(",")[0]
                students.setdefault(name, []).append(r)
    ms = meter({f"{name}/{i}": load_student(r["checkpoint"]) for name, rs in students.items() for i, r in
                enumerate(rs)})  # fmt: skip
    lines, summary = [], {}
    for name, rs in students.items():
        lat = statistics.median(ms[f"{name}/{i}"] for i in range(len(rs)))
        acc = [r["test_acc"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        summary[name] = (lat, statistics.fmean(acc))
        channels = getattr(load_student(rs[0]["checkpoint"]), "channels", "-")
        lines.append([name, len(rs), f"{rs[0]['params']:,}", str(channels).replace(" ", ""), rs[0]["epochs"],
                      f"{lat:.3f}", f"{statistics.fmean(acc):.4f} ± {sd:.4f}"])  # fmt: skip
    header = ["student", "seeds", "params (seed 0)", "channels (seed 0)", "epochs", "ms (median)", "test acc"]
    text = markdown_table(header, "lrrlrrr", lines)
    target = json.loads((out / "target.json").read_text())
    family = {n: v for n, v in summary.items() if not n.startswith("pruned")}
    fraction = states[0]["settings"].get("target_latency")
    goal = f"{target['target_ms']:.3f} ms" if fraction is None else (
        f"{fraction:g} of StudentNet 1.0's time, timed beside it by each run (" + ", ".join(
            f"{s['target_latency_ms']:.3f}" for s in states) + " ms)")  # fmt: skip
    paragraphs = [f"Target {goal}; width 1.0 measured at {target['width_1_ms']:.3f} ms before the runs "
                  f"({target['measured on']}); all students timed side by side here, {torch.get_num_threads()} "
                  f"threads."]  # fmt: skip
    for criterion in sorted(criteria):
        by = f", {criterion}" if criteria != {"l1"} else ""
        said = " ".join(_verdict(*summary[f"pruned (final){by}"], family))
        paragraphs.append(f"Pruned by {criterion}: {said}" if by else said)
    return "\n\n".join([text, *paragraphs])


def _verdict(pruned_ms: float, pruned_acc: float, family: dict[str, tuple[float, float]]) -> list[str]:
    """The pruned student against the family: the best width as fast, the fastest as accurate."""
    verdict = []
    no_slower = {n: v for n, v in family.items() if v[0] <= pruned_ms}
    if no_slower:
        name, (lat, acc) = max(no_slower.items(), key=lambda kv: kv[1][1])
        verdict.append(f"At equal or lower latency the best width is {name} ({lat:.3f} ms, {acc:.4f}): "
                       f"prune-distill {100 * (pruned_acc - acc):+.2f} points.")  # fmt: skip
    else:
        verdict.append(f"No baseline runs as fast as the pruned student ({pruned_ms:.3f} ms).")
    as_accurate = {n: v for n, v in family.items() if v[1] >= pruned_acc}
    if as_accurate:
        name, (lat, acc) = min(as_accurate.items(), key=lambda kv: kv[1][0])
        verdict.append(f"The fastest width at least as accurate is {name} ({lat:.3f} ms): the pruned student is "
                       f"{lat / pruned_ms:.2f}x its speed.")  # fmt: skip
    else:
        verdict.append(f"No baseline is as accurate as the pruned student ({pruned_acc:.4f}).")
    return verdict


if __name__ == "__main__":
    main()
