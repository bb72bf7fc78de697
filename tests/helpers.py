"""Helpers for tests: a tiny registered student, a cut-down Trainer and the real Fashion-MNIST with small batches.

Importing this module registers ``test_studentnet``; the tests and the scripts they spawn import it (conftest does).
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from pytorch_lightning import Callback, Trainer

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
    """configs/fmnist/kd.yaml shrunk for tests: the tiny StudentNet, one epoch of a few batches, the given teacher."""
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "fmnist" / "kd.yaml").read_text())
    small = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2,
             "accelerator": "cpu"}  # fmt: skip
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


def run_script(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the repository root, run in this process (a process per call cost 5 s of imports).

    The script runs as ``__main__`` with that ``sys.argv``; its output is captured, a ``SystemExit`` becomes the
    status the interpreter would give (its message on stderr), and the working directory, ``sys.argv``, torch's
    threads and random state are put back after it. Any other exception propagates. With ``check``, a non-zero
    status raises ``subprocess.CalledProcessError``, as ``subprocess.run(..., check=True)`` does.
    """
    root = Path(__file__).parents[1]
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    try:
        sys.argv = [str(root / script), *args]
        os.chdir(root)
        with torch.random.fork_rng(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(root / script), run_name="__main__")
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
    done = subprocess.CompletedProcess([sys.executable, script, *args], code, out.getvalue(), err.getvalue())
    if check:
        done.check_returncode()
    return done


def start_distill(*args: str, log: Path | None = None, threads: int | None = None) -> subprocess.Popen:
    """``distill <args>`` in a process group of its own (so a test can kill it like a user would), from the repo.

    Output goes to ``log`` (or nowhere); ``threads`` sets OMP_NUM_THREADS (default: this process's torch threads).
    Ctrl-C (SIGINT) reaches it as in a terminal, though a shell's background job (CI's) ignores it.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=Path(__file__).parents[1],
        stdout=open(log, "w") if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads())},
    )


class RunsCode:
    """A pickle that would create ``path`` if anything unpickled it (to show that nothing did)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class PressCtrlC(Callback):
    """Interrupts training after the first batch of epoch ``epoch``, as Ctrl-C in a terminal does: a SIGINT."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: Trainer, *_: object) -> None:
        if trainer.current_epoch >= self.epoch:
            os.kill(os.getpid(), signal.SIGINT)
