"""How to recover after pruning: prune-distill schedules against the thin StudentNet, at equal epochs.

Run after ``distill quickstart`` (it uses that run's teacher, student recipe and teacher-logit cache):

    python benchmarks/prune_recovery.py                                     # the quickstart's 3-epoch student
    python benchmarks/prune_recovery.py --start-epochs 15 --extra-epochs 10 # a longer regime
    python benchmarks/prune_recovery.py --variants rounds_rewind taylor      # a subset
    python benchmarks/prune_recovery.py --seed 1                             # another seed, then:
    python benchmarks/prune_recovery.py --seed-table runs/prune_recovery/s3_e3 runs/prune_recovery/s3_e3_seed1

Every variant starts from the same KD student (``--start-epochs`` of the quickstart's student recipe,
seed 0, trained once into ``<quickstart>/student_<N>_epochs`` and shared by every ``--seed``) and
spends ``--extra-epochs`` more epochs pruning to ``--target-params`` and distilling, with
``distill prune-distill``. The thin StudentNet of the same size is prune-distill's own baseline (sized
by the first variant listed), distilled from scratch for the start's epochs plus the extra ones. The
table gives each variant's best student under the target (chosen on validation) and its test-accuracy
gap to the thin net. A last row trains that thin net for the extra epochs only: what a user who
already has the trained student could do instead of pruning it.

The variants (``--extra-epochs E``, ``e = max(1, E // 5)``):

- ``rounds_finetune``: 2 geometric rounds of ``e`` epochs at a tenth of the learning rate, then ``E - 2e``
  final epochs with the recipe's schedule (the shape of ``configs/fmnist/prune_distill.yaml``);
- ``rounds_rewind``: the same with learning-rate rewinding in the rounds (Renda et al. 2020);
- ``oneshot_rewind``: one pruning step, then all ``E`` epochs in one phase with the recipe's schedule;
- ``oneshot_rewind_seed_layers``: the same, pruning only the layers StudentNet's ``width_mult`` scales, so
  the result has the thin net's layout (a test of inheriting weights alone);
- ``taylor``, ``global_l1``: ``oneshot_rewind`` with the Taylor criterion, or with one l1 ranking across layers;
- ``taylor_seed_layers``: ``oneshot_rewind_seed_layers`` with the Taylor criterion;
- ``rounds_rewind_seed_layers``: ``rounds_rewind`` pruning only the layers ``width_mult`` scales.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from distill.prune_distill import prune_distill
from distill.recipes import fit_recipe, load_recipe, relocate
from students import UNSCALED_LAYERS

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = (
    "rounds_finetune",
    "rounds_rewind",
    "oneshot_rewind",
    "oneshot_rewind_seed_layers",
    "taylor",
    "taylor_seed_layers",
    "rounds_rewind_seed_layers",
    "global_l1",
)
DEFAULT_VARIANTS = VARIANTS[:4]


def variant_options(name: str, extra: int) -> dict[str, Any]:
    """The prune_distill arguments of a variant that spends ``extra`` epochs after the start."""
    e = max(1, extra // 5)
    oneshot = {"rounds": 1, "epochs_per_round": extra, "final_epochs": 0, "lr_rewinding": True}
    rounds = {"rounds": 2, "epochs_per_round": e, "final_epochs": extra - 2 * e}
    seed_layers = {"ignored_layers": list(UNSCALED_LAYERS)}  # prune only what StudentNet's width_mult scales
    return {
        "rounds_finetune": {**rounds, "lr_rewinding": False},
        "rounds_rewind": {**rounds, "lr_rewinding": True},
        "oneshot_rewind": oneshot,
        "oneshot_rewind_seed_layers": {**oneshot, **seed_layers},
        "taylor": {**oneshot, "importance": "taylor"},
        "taylor_seed_layers": {**oneshot, "importance": "taylor", **seed_layers},
        "rounds_rewind_seed_layers": {**rounds, "lr_rewinding": True, **seed_layers},
        "global_l1": {**oneshot, "global_ranking": True},
    }[name]


def start_student(args: argparse.Namespace) -> str:
    """The KD student every variant starts from: the quickstart's, or the same recipe for more epochs.

    The longer one is trained once, in the quickstart's folder, and shared by every seed and ``--out``.
    """
    recipe = load_recipe(args.quickstart / "student.yaml")
    if args.start_epochs == recipe["trainer"]["max_epochs"]:
        return str(args.quickstart / "student" / "best.ckpt")
    out = args.quickstart / f"student_{args.start_epochs}_epochs"
    cfg = relocate(recipe, out)
    cfg["trainer"]["max_epochs"] = args.start_epochs
    cfg["trainer"]["enable_progress_bar"] = False
    done = out / "best.ckpt"
    return str(done) if done.is_file() else fit_recipe(cfg, out.with_suffix(".yaml")).checkpoint


def thin_for_extra_epochs(run: Path, out: Path, epochs: int) -> Any:
    """The same thin StudentNet as prune-distill's baseline (its config), distilled for ``epochs`` only."""
    cfg = relocate(load_recipe(next(run.glob("baseline_w*.yaml"))), out)  # the one baseline of a size target
    cfg["trainer"]["max_epochs"] = epochs
    cfg["model"]["warmup_epochs"] = min(float(cfg["model"].get("warmup_epochs", 0)), epochs / 4)
    return fit_recipe(cfg, out.with_suffix(".yaml"))


def seed_table(runs: list[Path]) -> str:
    """One table over several seeds' runs (their ``table.md``): per-seed test accuracies and gaps, and means."""
    tables = []
    for run in runs:
        lines = (run / "table.md").read_text().splitlines()
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
        tables.append({c[0]: c[1:] for c in cells[1:]})  # after the header row
    names = list(tables[0])
    if any(list(t) != names for t in tables):
        raise SystemExit(f"the runs {', '.join(map(str, runs))} do not have the same rows: compare like with like")
    seeds = len(runs)
    lines = [
        f"| {seeds} seeds | params | val acc (mean) | test acc | test, mean ± std | test vs thin (points) | mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        params = sorted({t[name][0] for t in tables})
        val = statistics.mean(float(t[name][1]) for t in tables)
        test = [float(t[name][2]) for t in tables]
        gaps = [t[name][3] for t in tables]
        gap = "-" if "-" in gaps else "0" if set(gaps) == {"0"} else f"{statistics.mean(map(float, gaps)):+.2f}"
        spread = statistics.stdev(test) if seeds > 1 else 0.0
        lines.append(
            f"| {name} | {' / '.join(params)} | {val:.4f} | {' / '.join(f'{x:.4f}' for x in test)} | "
            f"{statistics.mean(test):.4f} ± {spread:.4f} | {' / '.join(gaps)} | {gap} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, default=ROOT / "runs" / "quickstart", help="distill quickstart run")
    parser.add_argument("--start-epochs", type=int, default=3, help="KD epochs of the starting student")
    parser.add_argument("--extra-epochs", type=int, default=3, help="epochs each variant spends after the start")
    parser.add_argument("--target-params", type=int, default=100_000)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seed", type=int, default=0, help="prune-distill's seed (the start student stays the same)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: runs/prune_recovery/s{start}_e{extra}[_seed{seed}]"
    )
    parser.add_argument(
        "--seed-table", type=Path, nargs="+", metavar="RUN", help="only print one table over these runs (e.g. seeds)"
    )
    args = parser.parse_args()
    if args.seed_table:
        missing = [str(run) for run in args.seed_table if not (run / "table.md").is_file()]
        if missing:
            parser.error(f"no table.md in {', '.join(missing)}: run the benchmark there first (--out)")
        print(seed_table(args.seed_table))
        return
    if not (args.quickstart / "student.yaml").is_file():
        parser.error(f"{args.quickstart}/student.yaml not found: run `distill quickstart` first, or pass --quickstart")
    if args.extra_epochs < 2:
        parser.error("--extra-epochs must be at least 2 (a round and a final epoch)")
    name = f"s{args.start_epochs}_e{args.extra_epochs}" + (f"_seed{args.seed}" if args.seed else "")
    out = (args.out or ROOT / "runs" / "prune_recovery" / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.quickstart = args.quickstart.resolve()
    os.chdir(ROOT)  # the quickstart's recipe names its logit cache relative to the repository root
    start = start_student(args)

    results: dict[str, dict[str, Any]] = {}
    thin = None
    for i, name in enumerate(args.variants):
        rows = prune_distill(
            recipe=str(args.quickstart / "student.yaml"),  # its TeacherLogitCache serves every run
            student_checkpoint=start,
            target_params=args.target_params,
            baseline=i == 0,
            export_onnx=False,
            cache_teacher_logits=False,
            round_to=1,  # as recorded in RESULTS.md (issue 5), before prune-distill's default became 8
            run_dir=str(out / name),
            seed=args.seed,
            **variant_options(name, args.extra_epochs),
        )
        under = [r for r in rows if r["phase"] in ("round", "final") and r["params"] <= args.target_params]
        results[name] = max(under, key=lambda r: (r["val_acc"], r["round"]))
        thin = thin or next((r for r in rows if r["phase"] == "baseline"), None)

    short = thin_for_extra_epochs(out / args.variants[0], out / "thin_extra", args.extra_epochs) if thin else None
    start_row = rows[0]
    lines = [
        f"Start: StudentNet 1.0, {start_row['params']:,} parameters, {start_row['epochs']} KD epochs; "
        f"each variant {args.extra_epochs} more. Target {args.target_params:,} parameters.",
        "",
        "| variant | params | val acc | test acc | test vs thin (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        gap = "-" if thin is None else f"{100 * (r['test_acc'] - thin['test_acc']):+.2f}"
        lines.append(f"| {name} | {r['params']:,} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | {gap} |")
    if thin is not None:
        lines.append(
            f"| thin StudentNet, KD from scratch, {thin['epochs']} epochs | {thin['params']:,} | "
            f"{thin['val_acc']:.4f} | {thin['test_acc']:.4f} | 0 |"
        )
    if short is not None:
        lines.append(
            f"| thin StudentNet, KD from scratch, {args.extra_epochs} epochs (the variants' extra epochs only) | "
            f"{short.params:,} | {short.val_acc:.4f} | {short.test_acc:.4f} | "
            f"{100 * (short.test_acc - thin['test_acc']):+.2f} |"
        )
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nWritten: {out / 'table.md'}")


if __name__ == "__main__":
    main()
