"""Running a YAML recipe of ``configs/`` from Python, as jobs that train several times do.

A recipe is a ``distill fit`` config. Jobs load it, change it (sizes, outputs, loss settings),
write the exact config they run next to its outputs, and run it through the same CLI.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["FitResult", "fit_recipe", "load_recipe", "merge", "relocate"]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` as a dict, with a clear error when it is missing."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe {str(path)!r} not found. Run from the repository root or pass its path.")
    return yaml.safe_load(file.read_text())


def merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in, key by key (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def relocate(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """A copy of ``cfg`` whose logs and checkpoints go to ``out``."""
    cfg = copy.deepcopy(cfg)
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out)
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(out)
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(out)
    return cfg


def check_teacher(cfg: dict[str, Any], recipe: str) -> None:
    """Fail before any training if the recipe has no teacher or its checkpoint file is missing."""
    teacher = cfg.get("model", {}).get("teacher")
    if not teacher:
        raise ValueError(f"The sweep distills from a teacher, but {recipe} sets no model.teacher.")
    missing = [path for path in _checkpoints(teacher) if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Teacher checkpoint {missing[0]!r} (from {recipe}) does not exist. Train the teacher first, "
            f"e.g. `distill fit --config configs/fmnist/teacher.yaml`, or set its path with overrides."
        )


def _checkpoints(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "checkpoint" and isinstance(value, str):
                yield value
            else:
                yield from _checkpoints(value)
    elif isinstance(node, list):
        for value in node:
            yield from _checkpoints(value)


@dataclass
class FitResult:
    """What one recipe run produced."""

    checkpoint: str
    val_acc: float
    test_acc: float
    teacher_test_acc: float | None
    params: int
    epochs: int
    wall_s: float
    model_name: str


def fit_recipe(cfg: dict[str, Any], config_path: Path) -> FitResult:
    """Write ``cfg`` to ``config_path``, run ``distill fit`` on it, then test its best checkpoint.

    The best checkpoint is the one of the first ``ModelCheckpoint`` (chosen on the validation split);
    the test split is evaluated once, on it.
    """
    from distill.cli import DistillCLI

    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.time()
    with warnings.catch_warnings():  # the job's own argv is in sys.argv; the args given here are the run's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # The folder is the job's own, and the CLI has just saved config.yaml in it: not a stale run
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        cli = DistillCLI(args=["fit", "--config", str(config_path)])
    wall = time.time() - start
    checkpoint = cli.trainer.checkpoint_callback
    best = checkpoint.best_model_path
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    student = cli.model.student
    teacher_acc = metrics[0].get("test/teacher_acc")
    return FitResult(
        checkpoint=best,
        val_acc=float(checkpoint.best_model_score),
        test_acc=float(metrics[0]["test/acc"]),
        teacher_test_acc=None if teacher_acc is None else float(teacher_acc),
        params=sum(p.numel() for p in student.parameters()),
        epochs=cli.trainer.current_epoch,
        wall_s=wall,
        model_name=getattr(student, "model_spec", {}).get("name", type(student).__name__).removeprefix("timm/"),
    )
