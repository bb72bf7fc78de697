"""Image folders (one sub-folder per class), e.g. Food-11, decoded with PIL by DataLoader workers."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from distill.data.base import SplitDataModule
from distill.data.batch import collate_samples

__all__ = ["ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(SplitDataModule):
    """A dataset of image files in ``<root>/<split>/<class>/<image>`` (torchvision's ImageFolder layout).

    Images are found at any depth under their class folder, hidden files and folders left out; links to folders
    are followed, as torchvision follows them, but a link to a folder they lie in is refused (a loop).

    For Food-11 (seed 004) use ``train_dir: training``, ``val_dir: validation``, ``test_dir: evaluation``.

    Args:
        root: dataset folder.
        train_dir: training split folder under ``root``.
        val_dir: validation split folder; ``None`` takes ``val_size`` images out of the training split.
        test_dir: test split folder; ``None`` if there is none.
        predict_dir: a folder of images to classify with ``distill predict``, found at any depth under it and
            unlabelled (label -1 in ``predictions.csv``); relative to ``root``, or absolute. Default: the test split.
        image_size: side of the square crops the model sees.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: with ``val_dir=None``: validation images out of the training split (count or fraction).
        augment: random-resized crop and horizontal flip on the training split (else as evaluated: the shorter
            side resized to ``floor(image_size / 0.875)``, then a center crop, as timm evaluates).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        num_workers: DataLoader worker processes (image decoding is the bottleneck here).
        split_seed: seed of the train/validation split.
    """

    in_chans = 3
    crop_pct = 0.875
    interpolation = "bilinear"  # torchvision's Resize, with antialiasing

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str | None = None,
        test_dir: str | None = "test",
        predict_dir: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_size: int | float = 0.1,
        augment: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_workers: int = 4,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, split_seed)
        self.root = Path(root).expanduser()
        train_path = self.root / train_dir
        if not train_path.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule: training folder {train_path} does not exist. Expected "
                f"<root>/<train_dir>/<class>/<image files>; set root and train_dir."
            )
        self.classes = visible_classes(train_path)
        if len(self.classes) < 2:  # a classifier of one class is always right, and KD's soft term is 0
            raise ValueError(f"ImageFolderDataModule: {train_path} holds one class folder ({self.classes[0]}); a "
                             f"classifier needs at least two, one folder each")  # fmt: skip
        self.num_classes = len(self.classes)
        if predict_dir is not None and not str(predict_dir).strip():  # "" would be root itself, the training images too
            raise ValueError(
                "ImageFolderDataModule: predict_dir is empty: give the folder of images to classify, or null"
            )
        self.train_dir, self.val_dir, self.test_dir, self.predict_dir = train_dir, val_dir, test_dir, predict_dir
        self.predict_set: Dataset | None = None
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"ImageFolderDataModule: image_size must be a number of pixels >= 1, got {image_size!r}")
        self.image_size, self.augment = image_size, augment
        self.mean, self.std = tuple(mean), tuple(std)
        finite = all(math.isfinite(v) for v in self.mean + self.std)
        if (len(self.mean), len(self.std)) != (self.in_chans,) * 2 or not finite or min(self.std) <= 0:
            raise ValueError(f"ImageFolderDataModule: mean and std need {self.in_chans} finite numbers each (one per "
                             f"RGB channel), std > 0; got mean={list(self.mean)}, std={list(self.std)}")  # fmt: skip
        if max(self.mean + self.std) > 1:  # e.g. [123.675, 116.28, 103.53]: every input would be nearly constant
            scaled = [[round(v / 255, 3) for v in values] for values in (self.mean, self.std)]
            raise ValueError(f"ImageFolderDataModule: mean={list(self.mean)} and std={list(self.std)} are on the 0-255 "
                             f"scale, but pixels are read as 0-1: give them divided by 255 (mean={scaled[0]}, "
                             f"std={scaled[1]})")  # fmt: skip
        for name, split in (("val_dir", val_dir), ("test_dir", test_dir)):
            if split is not None and (self.root / split).resolve() == train_path.resolve():
                raise ValueError(f"ImageFolderDataModule: {name}={split!r} is the training folder: the model "
                                 f"would be scored on images it trained on; give a folder of other images, or "
                                 f"null")  # fmt: skip
        if (
            val_dir is not None
            and test_dir is not None
            and (self.root / val_dir).resolve() == (self.root / test_dir).resolve()
        ):
            raise ValueError(f"ImageFolderDataModule: val_dir={val_dir!r} is the test folder: the best checkpoint "
                             f"(and a sweep's setting) would be chosen on the images that report it; give a folder of "
                             f"other images, or null to take val_size images out of the training folder")  # fmt: skip
        self._identity: dict[str, str] = {}  # image_identity's, each part read once
        self._listings: dict[str, list[tuple[str, int]]] = {}  # (file, label) by split role

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def batch_settings(self) -> dict[str, Any]:
        return super().batch_settings() | {"augment": self.augment, "image_size": self.image_size,
                                           "mean": list(self.mean), "std": list(self.std)}  # fmt: skip

    #: How many files' bytes :meth:`image_identity` digests.
    SAMPLED_FILES = 16

    def image_identity(self, test: bool = True) -> dict[str, Any]:
        """What tells its images from another folder's, wherever ``root`` lies (a moved copy is the same data).

        ``files``: the training and validation images, how many and a digest of their class folders and file names;
        a fit's checkpoint records that much (``test=False``: there, renamed split folders are the same data too).
        A job's records add (``test``) ``test_files``, the test folder's, and ``bytes``, a digest of the contents of
        :attr:`SAMPLED_FILES` files spread over them all: another export under the same names (resized, re-encoded,
        corrupted) is other data, at the cost of a few reads rather than a pass over the dataset.
        """
        known = self._identity
        if "files" not in known:
            known["files"] = self._summary("train", "val")
        if not test:
            return {"files": known["files"]}
        if "bytes" not in known:
            if self._listing("test"):
                known["test_files"] = self._summary("test")
            known["bytes"] = self._sampled_bytes()
        return dict(known)

    def _listing(self, role: str) -> list[tuple[str, int]]:
        """The (file, label) pairs of the split folder of ``role`` (``train``, ``val``, ``test``); none where it has
        no folder."""
        if role not in self._listings:
            split = getattr(self, f"{role}_dir")
            folder = self.root / split if split is not None else None
            found = folder is not None and folder.is_dir()
            self._listings[role] = labelled_images(folder, self.classes, allow_empty=True) if found else []
        return self._listings[role]

    def _summary(self, *roles: str) -> str:
        """How many images the split folders of ``roles`` hold, and a digest of their names and labels."""
        listing, count = hashlib.sha256(), 0
        for role in roles:
            folder = self.root / (getattr(self, f"{role}_dir") or "")  # none: no files either
            for path, label in self._listing(role):
                listing.update(f"{role}/{Path(path).relative_to(folder).as_posix()}\0{label}\n".encode())
                count += 1
        return f"{count:,} images in {len(self.classes)} classes, listing {listing.hexdigest()[:12]}"

    def _sampled_bytes(self) -> str:
        """A digest of the bytes of :attr:`SAMPLED_FILES` files, spread evenly over every split and class."""
        files = [path for role in ("train", "val", "test") for path, _ in self._listing(role)]
        sampled, contents = files[:: max(1, len(files) // self.SAMPLED_FILES)][: self.SAMPLED_FILES], hashlib.sha256()
        for path in sampled:
            try:
                contents.update(Path(path).read_bytes())
            except OSError as err:
                raise ValueError(
                    f"{path} cannot be read ({err.strerror or err}): fix its permissions, or remove it"
                ) from None
        return f"{len(sampled)} files sampled, digest {contents.hexdigest()[:12]}"

    def _transform(self, train: bool) -> T.Compose:
        size = self.image_size
        steps = (
            [T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
            if train and self.augment
            else [T.Resize(math.floor(size / self.crop_pct)), T.CenterCrop(size)]  # as timm evaluates
        )
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _folder(self, split_dir: str, train: bool) -> Dataset:
        path = self.root / split_dir
        if not path.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: split folder {path} does not exist.")
        try:
            dataset = _VisibleImages(str(path), self._transform(train))
        except FileNotFoundError as err:  # a class folder without images
            why, kinds = str(err).rstrip(" ."), " ".join(IMG_EXTENSIONS)
            raise ValueError(f"ImageFolderDataModule: {path}: {why}: put image files ({kinds}; not hidden ones) in "
                             f"it, or remove it") from None  # fmt: skip
        if dataset.classes != self.classes:
            raise ValueError(f"{path} has classes {dataset.classes}, but {self.train_dir} has {self.classes}")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            if self.val_dir is not None:
                self.train_set = self._folder(self.train_dir, train=True)
                self.val_set = self._folder(self.val_dir, train=False)
            else:
                train_view = self._folder(self.train_dir, train=True)
                eval_view = self._folder(self.train_dir, train=False)
                train_idx, val_idx = self.split_indices(len(train_view))
                self.train_set = Subset(train_view, train_idx.tolist())
                self.val_set = Subset(eval_view, val_idx.tolist())
        if stage == "predict" and self.predict_dir is not None:
            if self.predict_set is None:
                self.predict_set = _UnlabelledImages(self.root / self.predict_dir, self._transform(train=False))
        elif stage in (None, "test", "predict") and self.test_set is None and self.test_dir is not None:
            self.test_set = self._folder(self.test_dir, train=False)

    def predict_dataloader(self) -> Any:
        """The images of ``predict_dir``, or else the test split."""
        if self.predict_dir is None:
            return super().predict_dataloader()
        return self._loader(self.predict_set, train=False, split="predict")

    def loader_options(self) -> dict[str, Any]:
        return {"collate_fn": collate_samples, "pin_memory": torch.cuda.is_available()}

    def _loader(self, dataset: Dataset | None, train: bool, split: str) -> Any:
        if dataset is None and split == "test" and self.test_dir is None:  # `distill test|predict`
            raise ValueError(f"{type(self).__name__} has no test split (test_dir is null): give "
                             f"data.init_args.test_dir, a folder of test images under root")  # fmt: skip
        return super()._loader(dataset, train, split)


def is_image_file(path: str, folder: str | Path | None = None) -> bool:
    """An image by its extension, as torchvision's ImageFolder takes it, but not hidden: macOS's ``._name.png``
    (resource forks, left by its archives) are not images, nor is a file in a hidden folder under ``folder`` (a
    ``.thumbs`` cache in a class folder)."""
    parts = Path(path).relative_to(folder).parts if folder is not None else (Path(path).name,)
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)


def visible_classes(folder: str | Path) -> list[str]:
    """The class folders of a split folder, sorted, as torchvision's ImageFolder finds them, but no hidden one
    (Jupyter's ``.ipynb_checkpoints``)."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolderDataModule: {folder} holds no class folder: put each class's images in a "
                         f"folder of its own, <split>/<class>/<image> (the folder names are the labels)")  # fmt: skip
    return classes


def image_files(top: str | Path, folder: str | Path) -> list[str]:
    """The image files (:func:`is_image_file`) under ``top`` at any depth, in the order of torchvision's
    ``make_dataset`` (by folder, then name), links to folders followed as it follows them, but a link to a folder
    it lies in refused: a loop would list its images again and again, those of other classes under this one."""
    chains, found = {str(top): (os.path.realpath(folder), os.path.realpath(top))}, []
    for parent, folders, names in os.walk(top, followlinks=True):
        chain = chains.pop(parent)  # the folders it lies in, its own included, as links resolve them
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in folders:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if any(c == real or c.startswith(real.rstrip(os.sep) + os.sep) for c in chain):
                raise ValueError(f"ImageFolderDataModule: {path} links to {real}, a folder it lies in, so its images "
                                 f"would be read again and again: remove the link")  # fmt: skip
            chains[path] = (*chain, real)
        found += [(parent, name) for name in names if is_image_file(os.path.join(parent, name), folder)]
    return [os.path.join(parent, name) for parent, name in sorted(found)]


def labelled_images(folder: str | Path, classes: Sequence[str], allow_empty: bool = False) -> list[tuple[str, int]]:
    """The (file, label) pairs of a split folder, ``<folder>/<class>/...``, as torchvision's ``make_dataset`` lists
    them (:func:`image_files`), its error for a class without images included."""
    listing = [(path, label) for label, name in enumerate(classes) for path in image_files(Path(folder, name), folder)]
    empty = set(classes) - {classes[label] for _, label in listing}
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}.")
    return listing


class _VisibleImages(ImageFolder):
    """torchvision's ImageFolder of a split folder, read with :func:`read_image`, without hidden folders and files
    (:func:`visible_classes`, :func:`labelled_images`)."""

    def __init__(self, root: str, transform: Any) -> None:
        super().__init__(root, transform, loader=read_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = visible_classes(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *_: Any, **__: Any) -> list[tuple[str, int]]:  # type: ignore[override]
        return labelled_images(directory, sorted(class_to_idx, key=class_to_idx.__getitem__))


class _UnlabelledImages(ImageFolder):
    """The images at any depth under ``folder`` (hidden ones left out), sorted by path, each labelled -1."""

    def __init__(self, folder: Path, transform: Any) -> None:
        if not folder.is_dir():
            why = ("is a file: give the folder that holds the images" if folder.exists() else "does not exist (a "
                   "relative predict_dir lies under root; give an absolute path for images elsewhere)")  # fmt: skip
            raise FileNotFoundError(f"ImageFolderDataModule: predict_dir {folder} {why}")
        super().__init__(str(folder), transform, loader=read_image, allow_empty=True)
        if not self.samples:
            kinds = " ".join(IMG_EXTENSIONS)
            raise ValueError(f"ImageFolderDataModule: predict_dir {folder} holds no image file ({kinds}; not "
                             f"hidden ones)")  # fmt: skip

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return [], {}

    def make_dataset(self, directory: str, *_: Any, **__: Any) -> list[tuple[str, int]]:  # type: ignore[override]
        return sorted((path, -1) for path in image_files(directory, directory))


def read_image(path: str) -> Any:
    """An RGB PIL image, as torchvision's loader reads it, naming the file it could not read.

    16-bit grayscale images are scaled to 8 bits first: PIL's RGB conversion clips them at 255, so every pixel
    above it reads white. PIL opens some as 32-bit integers (mode ``I``: PGM, PNG before Pillow 10.3); those
    are taken as 16-bit when their values fit, and refused otherwise, as float images are (no fixed range).
    """
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            if image.mode.startswith("I") or image.mode == "F":
                pixels = np.asarray(image, dtype=np.float64)
                if image.mode == "F" or pixels.min() < 0 or pixels.max() > 65535:
                    raise ValueError(f"{image.mode} pixels of {pixels.min():g} to {pixels.max():g} have no fixed "
                                     f"range; convert it to 8 or 16 bits")  # fmt: skip
                image = Image.fromarray((pixels / 257).round().astype(np.uint8))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError: OSError
        why = "PIL cannot tell its format" if "cannot identify image file" in str(err) else str(err)
        raise ValueError(f"{path} is not a readable image ({' '.join(why.split())}): remove or replace it") from None
