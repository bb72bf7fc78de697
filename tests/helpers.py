"""Helpers for tests: a cut-down Trainer and the real Fashion-MNIST with small batches."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning import Trainer

from distill import FashionMNISTDataModule


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
