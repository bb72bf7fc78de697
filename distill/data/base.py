"""What every datamodule shares: batch sizes, the train/validation split and the DataLoaders."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from distill.data.batch import Batch
from distill.data.split import check_val_size, split_indices

__all__ = ["SplitDataModule", "check_trained_data", "class_names", "model_data_mismatch", "same_setting"]


class SplitDataModule(LightningDataModule):
    """Base of the datamodules: checks and keeps the loader settings, splits, and builds the loaders.

    Subclasses fill ``train_set``, ``val_set`` and ``test_set`` in ``setup``; their loaders yield
    :class:`~distill.data.batch.Batch` objects (:meth:`loader_options` picks the ``collate_fn``).

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: validation images taken from the training set: a count, or a fraction in (0, 1).
        num_workers: DataLoader worker processes.
        split_seed: seed of the train/validation split.
    """

    #: The class names, in the order of the labels (``None`` where unknown, e.g. CIFAR before it is read).
    classes: Sequence[str] | None = None
    #: How evaluation makes an image the model's size (see :meth:`model_inputs`; ``None``: not said).
    crop_pct: float | None = None
    interpolation: str | None = None

    def __init__(
        self, batch_size: int, eval_batch_size: int | None, val_size: int | float, num_workers: int, split_seed: int
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: batches built in this process), got {num_workers}")
        check_val_size(val_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves of the datamodule in each checkpoint, which a resumed fit must keep (``distill fit``
        checks them before it trains: see ``recorded``): the settings of the train/validation ``split``, the
        ``batches`` training is made of (:meth:`batch_settings`), and which training and validation ``images``
        (:meth:`image_identity`); and what a model trained on it takes and predicts (:meth:`model_inputs`,
        ``classes``), which a teacher's or an evaluated checkpoint's data is checked against
        (:func:`model_data_mismatch`)."""
        return {
            "split": {"val_size": self.val_size, "split_seed": self.split_seed},
            "batches": self.batch_settings(),
            "images": self.image_identity(test=False),  # what a fit learns from and chooses on
            "inputs": self.model_inputs(),
            "classes": class_names(self),
        }

    def batch_settings(self) -> dict[str, Any]:
        """The settings that make the training batches: their size, and a subclass's augmentation and input size."""
        return {"batch_size": self.batch_size}

    def image_identity(self, test: bool = True) -> dict[str, Any]:
        """What tells the images this datamodule reads (``test``: the test split's too) from another's of its class,
        wherever they lie (an image folder's listing: a recipe's identity then leaves out its ``root``); empty where
        the class names them (Fashion-MNIST, CIFAR)."""
        return {}

    def model_inputs(self) -> dict[str, Any]:
        """What the model sees of an image: its ``size`` (H, W) and the per-channel ``mean`` and ``std`` it is
        normalised with (those this datamodule has); and, in timm's ``pretrained_cfg`` terms, how an image is made
        that size for evaluation: resized (``interpolation``) so its shorter side is ``floor(size / crop_pct)``,
        then center-cropped to ``size``."""
        named = {"size": (getattr(self, "input_size", None), int), "mean": (getattr(self, "mean", None), float),
                 "std": (getattr(self, "std", None), float)}  # fmt: skip
        inputs = {}
        for key, (value, kind) in named.items():  # plain numbers: a checkpoint is read back with weights_only
            try:
                dtype = torch.float64 if kind is float else torch.int64
                inputs[key] = [kind(v) for v in torch.as_tensor(value, dtype=dtype).flatten().tolist()]
            except (TypeError, ValueError, RuntimeError):  # absent (None), or not numbers: not recorded
                continue
        said = {"crop_pct": (self.crop_pct, float), "interpolation": (self.interpolation, str)}
        return inputs | {key: kind(value) for key, (value, kind) in said.items() if value is not None}

    @classmethod
    def recorded(cls, checkpoint: dict[str, Any], key: str) -> dict[str, Any] | None:
        """The ``key`` entry (``split``, ``batches``) of what a checkpoint of a run on this datamodule records
        (``None`` where an older one has none)."""
        return (checkpoint.get(cls.__qualname__) or {}).get(key)

    def split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and validation indices of an ``n``-image training set (fixed by ``split_seed``)."""
        return split_indices(n, self.val_size, self.split_seed)

    def loader_options(self) -> dict[str, Any]:
        """Extra DataLoader arguments of this datamodule (at least its ``collate_fn``)."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset | None, train: bool, split: str) -> Iterable[Batch]:
        if dataset is None:  # one line from `distill test|predict` on data without a test split
            raise ValueError(f"{type(self).__name__}: the {split} split is not set up (setup() was not called for "
                             f"its stage)")  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **self.loader_options(),
        )

    def train_dataloader(self) -> Iterable[Batch]:
        return self._loader(self.train_set, train=True, split="train")

    def val_dataloader(self) -> Iterable[Batch]:
        return self._loader(self.val_set, train=False, split="val")

    def test_dataloader(self) -> Iterable[Batch]:
        return self._loader(self.test_set, train=False, split="test")

    def predict_dataloader(self) -> Iterable[Batch]:
        """The test split: ``distill predict`` writes the student's prediction for each of its images."""
        return self._loader(self.test_set, train=False, split="test")


def model_data_mismatch(recorded: Mapping[str, Any], datamodule: Any) -> tuple[str | None, str | None]:
    """How ``datamodule`` differs from the data a model was trained on (the record of its checkpoint:
    :func:`students.checkpoint.recorded_data`), as (what makes the model's outputs wrong, what makes them worse):
    other class names, or another normalisation, give a classifier's outputs another meaning; another input size
    only costs it accuracy. ``None`` where they agree, or where either side does not say (a checkpoint written
    before these were recorded)."""
    now, was = class_names(datamodule), _composed(recorded.get("classes"))
    inputs_now = datamodule.model_inputs() if isinstance(datamodule, SplitDataModule) else {}
    inputs_was = recorded.get("inputs") or {}
    wrong = worse = None
    if now is not None and was is not None and now != was:
        at = next(
            (i for i, pair in enumerate(zip(was, now, strict=False)) if pair[0] != pair[1]), min(len(was), len(now))
        )
        there, here = (repr(c[at]) if at < len(c) else "none" for c in (was, now))
        wrong = (
            f"its classes differ from this data's (class {at} is {there} there, {here} here; {len(was)} classes there)"
        )
    else:
        changed = [k for k in ("mean", "std") if k in inputs_now and k in inputs_was
                   and not same_setting(inputs_now[k], inputs_was[k])]  # fmt: skip
        if changed:
            differ = ", ".join(f"{k} {inputs_was[k]} there, {inputs_now[k]} here" for k in changed)
            wrong = f"its normalisation differs from this data's ({differ})"
    size_now, size_was = (list(inputs.get("size") or ()) for inputs in (inputs_now, inputs_was))
    if size_now and size_was and size_now != size_was:
        worse = f"its images were {'x'.join(map(str, size_was))}, and this data's are {'x'.join(map(str, size_now))}"
    return wrong, worse


def check_trained_data(
    source: str, trained_on: tuple[str, Mapping[str, Any]], datamodule: Any, harm: str, cost: str | None = None
) -> None:
    """Refuse ``datamodule`` where it gives the outputs of a model trained on ``trained_on`` (a datamodule class
    name and record: :func:`students.checkpoint.recorded_data`) another meaning (:func:`model_data_mismatch`),
    saying ``harm`` and the fix; warn with ``cost`` where it only costs accuracy (another input size)."""
    name, record = trained_on
    wrong, worse = model_data_mismatch(record, datamodule)
    if wrong:
        raise ValueError(f"{source} was trained on {name} data, and {wrong}: {harm}")
    if worse and cost:
        rank_zero_warn(f"{source} was trained on {name} data, and {worse}: {cost}")


def class_names(datamodule: Any) -> list[str] | None:
    """``datamodule``'s ``classes`` as a list of plain strings (any sequence of names: a tuple, numpy's strings), in
    Unicode's composed form (NFC: a folder name copied by macOS or a zip tool may come decomposed); ``None`` where it
    has none, or something else."""
    return _composed(getattr(datamodule, "classes", None))


def _composed(classes: Any) -> list[str] | None:
    if isinstance(classes, (str, bytes, Mapping)) or not isinstance(classes, Iterable):
        return None
    return [unicodedata.normalize("NFC", str(name)) for name in classes]


def same_setting(a: Any, b: Any) -> bool:
    """Whether two recorded settings are the same: equal, or lists of as many numbers each within 0.001 (a mean
    or std: a float32 copy, or a value given to more digits, is the same normalisation)."""
    numbers = all(isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v) for v in (a, b))
    if not numbers or len(a) != len(b):
        return a == b
    return all(math.isclose(x, y, rel_tol=0, abs_tol=1e-3) for x, y in zip(a, b, strict=True))
