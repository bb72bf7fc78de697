"""Run the Fashion-MNIST recipes end to end and print one table (teachers, KD, ensemble KD, CE baseline).

    python benchmarks/fmnist_recipes.py --precision bf16-mixed            # the full recipes (GPU)
    python benchmarks/fmnist_recipes.py --teacher-epochs 1 --student-epochs 1 --limit 0.05   # smoke run
    python benchmarks/fmnist_recipes.py --teachers teacher --students kd student_ce           # a subset

Independent runs go in parallel (the two teachers; then the three students). Each run is the
`distill fit` command of its recipe; the test accuracy comes from `distill`'s best checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from distill.lightning_cli import default_precision

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("teacher", "teacher_seed1", "teacher_ls", "teacher_re")
STUDENTS = ("kd", "ensemble_kd", "student_ce")


def fit(recipe: str, epochs: int, args: argparse.Namespace) -> float:
    """Run one recipe with `distill fit`; return its wall time in seconds."""
    cmd = [sys.executable, "-m", "distill.cli", "fit", "--config", f"configs/fmnist/{recipe}.yaml"]
    cmd += ["--trainer.max_epochs", str(epochs), "--trainer.precision", args.precision]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", str(args.limit)]
    if args.data_root:
        cmd += ["--data.init_args.root", args.data_root]
    start = time.time()
    log = ROOT / "runs" / "fmnist" / f"{recipe}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{recipe} failed (exit {done.returncode}); end of {log}:\n{tail}")
    (ROOT / "runs" / "fmnist" / recipe / "finished").touch()  # every epoch ran (a killed run leaves a best.ckpt too)
    return time.time() - start


def evaluate(recipe: str, args: argparse.Namespace) -> dict:
    """`distill test` of the recipe's best checkpoint (the teacher is rebuilt from the recipe)."""
    from distill.lightning_cli import DistillCLI

    ckpt = ROOT / "runs" / "fmnist" / recipe / "best.ckpt"
    cli_args = ["test", "--config", f"configs/fmnist/{recipe}.yaml", "--ckpt_path", str(ckpt)]
    cli_args += [
        "--trainer.precision",
        args.precision,
        "--trainer.logger",
        "false",
        "--data.init_args.batch_size",
        "1000",
    ]
    cli_args += ["--trainer.enable_progress_bar", "false"]
    if args.data_root:
        cli_args += ["--data.init_args.root", args.data_root]
    cli = DistillCLI(args=cli_args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    best_val = next(v["best_model_score"] for k, v in state["callbacks"].items() if "'monitor': 'val/acc'" in k)
    return {
        "params": sum(p.numel() for p in cli.model.student.parameters()),
        "epochs": state["epoch"] + 1,  # the epoch (1-based) of the best checkpoint
        "val_acc": float(best_val),
        "test_acc": metrics["test/acc"],
        "teacher_test_acc": metrics.get("test/teacher_acc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--precision", default=default_precision(), help="default: bf16-mixed on a GPU, else 32-true")
    parser.add_argument("--limit", type=float, default=1.0, help="fraction of training batches per epoch")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=TEACHERS, help="teachers to train")
    parser.add_argument("--students", nargs="*", default=list(STUDENTS), choices=STUDENTS, help="students to train")
    args = parser.parse_args()

    times = {}
    for recipes, epochs in ((args.teachers, args.teacher_epochs), (args.students, args.student_epochs)):
        with ThreadPoolExecutor() as pool:
            times |= dict(zip(recipes, pool.map(lambda r, e=epochs: fit(r, e, args), recipes), strict=True))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = [
        f"device: {device}, precision {args.precision}, {time.strftime('%Y-%m-%d')}",
        "",
        "| recipe | params | best epoch | best val acc | test acc | teacher test acc | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe in TEACHERS + STUDENTS:  # every recipe with a checkpoint, trained now or before
        if not (ROOT / "runs" / "fmnist" / recipe / "best.ckpt").is_file():
            continue
        r = evaluate(recipe, args)
        teacher = f"{r['teacher_test_acc']:.4f}" if r["teacher_test_acc"] is not None else "-"
        wall = f"{times[recipe]:.0f}" if recipe in times else "-"  # trained by an earlier call, or carried
        rows.append(
            f"| {recipe} | {r['params']:,} | {r['epochs']} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | "
            f"{teacher} | {wall} |"
        )
    table = "\n".join(rows)
    (ROOT / "runs" / "fmnist" / "recipes.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
