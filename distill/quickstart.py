"""``distill quickstart``: train a teacher, distill StudentNet from its checkpoint, print a table.

It runs the two recipes ``configs/fmnist/teacher.yaml`` and ``configs/fmnist/kd.yaml`` through the
same CLI as ``distill fit``, resized for a 2-core CPU: a ResNet-18 teacher with timm's standard stem
(cheap on 28x28 images) for 2 epochs, and StudentNet for 3, without augmentation. The exact configs
that ran are written into the run directory beside the checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from distill.recipes import fit_recipe, load_recipe, relocate

__all__ = ["quickstart"]


def quickstart(
    run_dir: str = "runs/quickstart",
    teacher_config: str = "configs/fmnist/teacher.yaml",
    kd_config: str = "configs/fmnist/kd.yaml",
    teacher_model: str = "resnet18",
    teacher_small_input: bool = False,
    teacher_epochs: int = 2,
    student_epochs: int = 3,
    batch_size: int = 256,
    augment: bool = False,
    limit_train_batches: float = 1.0,
    limit_eval_batches: float = 1.0,
    accelerator: str = "auto",
    data_root: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train a teacher, distill StudentNet from it, and print teacher and student side by side.

    Args:
        run_dir: output folder: ``teacher.yaml``, ``student.yaml`` (the configs that ran), ``teacher/`` and
            ``student/`` (checkpoints, metrics.csv, config.yaml) and ``summary.md``.
        teacher_config: the teacher recipe to start from.
        kd_config: the distillation recipe to start from.
        teacher_model: timm name of the teacher.
        teacher_small_input: give the (ResNet) teacher the small-image stem of the full recipe
            (more accurate, about 30x slower on a CPU).
        teacher_epochs: epochs of teacher training.
        student_epochs: epochs of distillation.
        batch_size: batch size of both runs.
        augment: random crop and flip (the full recipes use them; short runs do better without).
        limit_train_batches: fraction (or number) of training batches per epoch, for smoke runs.
        limit_eval_batches: fraction (or number) of validation and test batches.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        data_root: folder with the Fashion-MNIST files (default: the usual search, see FashionMNISTDataModule).

    Returns:
        ``{"teacher": {...}, "student": {...}}`` with model, params, val_acc, test_acc and checkpoint.
    """
    out = Path(run_dir)
    common = {
        "batch_size": batch_size,
        "augment": augment,
        "limit_train_batches": limit_train_batches,
        "limit_eval_batches": limit_eval_batches,
        "accelerator": accelerator,
        "data_root": data_root,
    }
    teacher_cfg = _resize(load_recipe(teacher_config), out / "teacher", epochs=teacher_epochs, **common)
    teacher_cfg["model"]["student"]["init_args"].update(name=teacher_model, small_input=teacher_small_input)
    teacher = fit_recipe(teacher_cfg, out / "teacher.yaml")

    student_cfg = _resize(load_recipe(kd_config), out / "student", epochs=student_epochs, **common)
    student_cfg["model"]["teacher"] = {
        "class_path": "teachers.load_teacher",
        "init_args": {"checkpoint": teacher.checkpoint},
    }
    student = fit_recipe(student_cfg, out / "student.yaml")

    results = {"teacher": asdict(teacher), "student": asdict(student)}
    table = _table(results)
    summary = (
        "# distill quickstart\n\n"
        f"{table}\n\n"
        "Fashion-MNIST test set (10,000 images, never used for choosing checkpoints); val = 5,000 images held "
        "out of the training set.\n\nReproduce: `distill fit --config "
        f"{out / 'teacher' / 'config.yaml'}` then `distill fit --config {out / 'student' / 'config.yaml'}`.\n"
    )
    (out / "summary.md").write_text(summary)
    print("\n" + table + f"\n\nWritten: {out / 'summary.md'}")
    return results


def _resize(
    cfg: dict[str, Any],
    out: Path,
    epochs: int,
    batch_size: int,
    augment: bool,
    limit_train_batches: float,
    limit_eval_batches: float,
    accelerator: str,
    data_root: str | None,
) -> dict[str, Any]:
    """A copy of a recipe with this run's size and output folder."""
    cfg = relocate(cfg, out)
    cfg["trainer"].update(
        max_epochs=epochs,
        accelerator=accelerator,
        limit_train_batches=limit_train_batches,
        limit_val_batches=limit_eval_batches,
        limit_test_batches=limit_eval_batches,
    )
    cfg["model"]["warmup_epochs"] = min(cfg["model"].get("warmup_epochs", 0), epochs / 4)
    data = cfg["data"]["init_args"]
    data.update(batch_size=batch_size, augment=augment)
    if data_root is not None:
        data["root"] = data_root
    return cfg


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| role | model | params | val acc | test acc | checkpoint |", "|---|---|---:|---:|---:|---|"]
    for role, r in results.items():
        accuracies = f"{r['val_acc']:.4f} | {r['test_acc']:.4f}"
        rows.append(f"| {role} | {r['model_name']} | {r['params']:,} | {accuracies} | {r['checkpoint']} |")
    return "\n".join(rows)
