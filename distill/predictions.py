"""What ``distill predict`` writes: the student's predicted class and its probability for every image, as CSV.

Lightning's ``predict`` keeps what ``predict_step`` returns in memory and leaves writing it to a
``BasePredictionWriter`` callback; ``distill predict`` adds this one unless the config names another.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from distill.data.batch import as_batch
from distill.rundir import atomic_path

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write ``predictions.csv``: for each image of the predict split (the datamodule's test split), in
    order, its index, its label, the student's predicted class and that class's softmax probability.

    The file is written once the split is done, in one step (an interrupted run leaves none behind).

    Args:
        path: the CSV file (default: ``predictions.csv`` in the trainer's log folder, e.g. the run's folder).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._rows: list[torch.Tensor] = []

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probability, predicted = prediction.detach().float().softmax(-1).max(-1)
        labels = as_batch(batch).y
        self._rows.append(torch.stack([labels.float(), predicted.float(), probability], 1).cpu())

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        path = self.output(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = torch.cat(self._rows).tolist() if self._rows else []
        with atomic_path(path) as partial, open(partial, "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(["index", "label", "predicted", "probability"])
            table.writerows([i, int(label), int(predicted), f"{p:.6f}"] for i, (label, predicted, p) in enumerate(rows))
        print(f"\nWritten: {path} ({len(rows):,} predictions)")
        self._rows = []

    def output(self, trainer: Any) -> Path:
        """The CSV file this writer writes for ``trainer`` (one per process when several share the work)."""
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        return path.with_suffix(f".rank{trainer.global_rank}.csv") if trainer.world_size > 1 else path
