"""What ``distill predict`` writes: the student's predicted class and its probability for every image, as CSV.

Lightning's ``predict`` keeps what ``predict_step`` returns in memory and leaves writing it to a
``BasePredictionWriter`` callback; ``distill predict`` adds this one unless the config names another.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import Subset
from torchvision.datasets import DatasetFolder

from distill.data.base import class_names
from distill.data.batch import as_batch
from distill.rundir import atomic_path, check_output

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write ``predictions.csv``: for each image of the predict split (the datamodule's test split), in
    order, its index, its label, the student's predicted class and that class's softmax probability; the
    names of both classes where the datamodule names its classes (``label_name``, ``predicted_name``), and the
    image's ``file`` where the split is read from files (an image folder). Under DDP each process writes the
    images it was given (``predictions.rank{r}.csv``), indexed in the split.

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
        path = self.output(trainer)  # a path that cannot or must not be written: say so before predicting
        inputs = {"the checkpoint predicted with": trainer.ckpt_path}
        for target in {Path(self.path) if self.path else path, path}:  # a folder is checked before a rank's suffix
            check_output(target, "PredictionWriter path", inputs, "predictions.csv")
        path.parent.mkdir(parents=True, exist_ok=True)

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
        if batch_indices is not None and len(batch_indices) == len(labels):  # Lightning's, from the sampler (DDP)
            index = torch.as_tensor(list(batch_indices), dtype=torch.float64)
        else:  # in-memory batches on the device: this process's share is every world_size-th image from its rank
            done = sum(len(r) for r in self._rows)
            place = torch.arange(done, done + len(labels), dtype=torch.float64)
            index = trainer.global_rank + trainer.world_size * place
        row = torch.stack([index, labels.double().cpu(), predicted.double().cpu(), probability.double().cpu()], 1)
        self._rows.append(row)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        path = self.output(trainer)
        rows = torch.cat(self._rows).tolist() if self._rows else []
        dataset = getattr(trainer.predict_dataloaders, "dataset", None)
        size = (len(dataset) if dataset is not None else 0) or math.inf
        rows = sorted(r for r in rows if r[0] < size)  # split evenly across processes, the last images came twice
        names = class_names(getattr(trainer, "datamodule", None))
        files = _files(dataset)
        header = ["index", "label", "predicted", "probability"]
        header += ["label_name", "predicted_name"] if names else []
        header += ["file"] if files else []

        def name(k: int) -> str:  # a label outside the classes (-1: unlabelled) has no name
            return names[k] if 0 <= k < len(names) else ""

        with atomic_path(path) as partial, open(partial, "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(header)
            for i, label, predicted, p in rows:
                i, label, predicted = int(i), int(label), int(predicted)
                named = [name(label), name(predicted)] if names else []
                table.writerow([i, label, predicted, f"{p:.6f}", *named, *([files[i]] if files else [])])
        print(f"\nWritten: {path} ({len(rows):,} prediction{'' if len(rows) == 1 else 's'})")
        self._rows = []

    def output(self, trainer: Any) -> Path:
        """The CSV file this writer writes for ``trainer`` (one per process when several share the work)."""
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        return path.with_suffix(f".rank{trainer.global_rank}.csv") if trainer.world_size > 1 else path


def _files(dataset: Any) -> list[str] | None:
    """The image file of each index of a split read from files (torchvision's ``ImageFolder``, or a ``Subset`` of
    one); ``None`` for any other dataset."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, DatasetFolder):
        return [dataset.dataset.samples[i][0] for i in dataset.indices]
    return [path for path, _ in dataset.samples] if isinstance(dataset, DatasetFolder) else None
