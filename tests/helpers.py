"""Helpers for tests: a tiny registered student, a cut-down Trainer and the real Fashion-MNIST with small batches.

Importing this module registers ``test_studentnet``; the tests and the scripts they spawn import it (conftest does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from pytorch_lightning import Trainer

from distill import FashionMNISTDataModule
from students import StudentNet, register_student


@register_student
def test_studentnet(**kwargs) -> StudentNet:
    """A tiny StudentNet (base 2, about 6k parameters) for tests; its checkpoints record ``studentnet``."""
    return StudentNet(**{"base": 2, **kwargs})


def tiny_trainer(tmp_path: Path, **kwargs) -> Trainer:
    """A Trainer cut down for tests: a few batches, CPU, no logger, no progress bar."""
    options = dict(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return Trainer(**options)


def fmnist(**kwargs) -> FashionMNISTDataModule:
    """The real Fashion-MNIST files, small batches."""
    kwargs.setdefault("batch_size", 32)
    kwargs.setdefault("val_size", 500)
    return FashionMNISTDataModule(**kwargs)


def tiny_kd_recipe(tmp_path: Path, teacher: Path, warmup_epochs: float | None = None, **trainer) -> Path:
    """configs/fmnist/kd.yaml shrunk for tests: the tiny StudentNet, a few batches, the given teacher."""
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "fmnist" / "kd.yaml").read_text())
    small = {"limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2, "accelerator": "cpu"}
    cfg["trainer"].update(small, enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"].update(trainer)
    cfg["model"]["student"]["init_args"] = {"base": 2, "num_pools": 3}
    cfg["model"]["teacher"]["init_args"]["checkpoint"] = str(teacher)
    if warmup_epochs is not None:
        cfg["model"]["warmup_epochs"] = warmup_epochs
    cfg["data"]["init_args"].update(batch_size=32, val_size=500, augment=False)
    path = tmp_path / "kd_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_distill(*args: str, log: Path | None = None, threads: int | None = None) -> subprocess.Popen:
    """``distill <args>`` in a process group of its own (so a test can kill it like a user would), from the repo.

    Output goes to ``log`` (or nowhere); ``threads`` sets OMP_NUM_THREADS (default: this process's torch threads).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=Path(__file__).parents[1],
        stdout=open(log, "w") if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads())},
    )


class RunsCode:
    """A pickle that would create ``path`` if anything unpickled it (to show that nothing did)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
