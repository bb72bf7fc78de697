"""Shared fixtures: real Fashion-MNIST, a cut-down Trainer and a tiny trained teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fmnist, tiny_trainer

from distill import DistillModule
from students import create_student


@pytest.fixture(autouse=True)
def _nothing_written_into_the_working_directory():
    """A test writes under its tmp_path: a run left in the working directory (LightningCLI's config.yaml where a
    recipe logs nowhere, lightning_logs/, runs/) would be read by the next test, and clutters a checkout."""
    before = {p.name: p.stat().st_mtime_ns for p in Path.cwd().iterdir()}
    yield
    after = {p.name: p.stat().st_mtime_ns for p in Path.cwd().iterdir()}
    written = sorted(name for name in after if name not in before or (name in ("runs", "config.yaml") and
                                                                       after[name] != before[name]))  # fmt: skip
    assert not written, f"the test wrote {written} into the working directory {Path.cwd()}"


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm test_resnet (small-image stem) trained for a few batches, saved by Lightning."""
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = DistillModule(
        student=create_student("timm/test_resnet", num_classes=10, in_chans=1, small_input=True), lr=0.01
    )
    trainer = tiny_trainer(out, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, datamodule=fmnist())
    path = out / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def small_teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cheap teacher (StudentNet, base 2) for tests whose teacher sees all 70k images (logit caches)."""
    out = tmp_path_factory.mktemp("small_teacher")
    torch.manual_seed(0)
    model = DistillModule(create_student("test_studentnet", base=2, num_classes=10, in_chans=1, num_pools=3), lr=0.01)
    trainer = tiny_trainer(out, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, datamodule=fmnist())
    path = out / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path
