"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) in their python-pickle format: 50k/10k 32x32 RGB images."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from distill.data.locate import CACHE_DIR, locate_dataset
from distill.data.memory import InMemoryDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]

SYSTEM_DIR = Path("/usr/share/datasets")


class _CIFARDataModule(InMemoryDataModule):
    """Shared loading for CIFAR-10/100.

    The extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) is looked for under ``root`` when
    it is given, and only there; else under ``/usr/share/datasets`` and ``~/.cache/distill/cifar``. A
    missing copy is downloaded from the official URL and checked against its MD5. Every pickle file is
    checked against its official MD5 before it is unpickled, always: unpickling runs whatever code a
    file asks for, so a file that is not the official one is never opened.

    Args:
        root: folder holding the extracted dataset folder, the only place looked when given (and the
            download target).
        download: allow the download when no copy is found.
        verify_checksums: kept so that configs saved before still load; must be true (the check is always on).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: validation images taken out of the 50,000 training images (count, or fraction).
        augment: random crop (padding 4) and horizontal flip on the training split.
        resize: resize to ``resize`` x ``resize``.
        num_workers: DataLoader worker processes.
        split_seed: seed of the train/validation split.
        on_device: keep the splits on the GPU and build batches there (``None``: when training on a GPU
            and they fit in a quarter of its free memory; ``False``: CPU memory and DataLoaders).
    """

    in_chans = 3
    native_size = 32
    crop_padding = 4
    name: str
    folder: str
    url: str
    archive_md5: str
    files: dict[str, dict[str, str]]  # split -> {file name: md5}
    label_key: str

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
        verify_checksums: bool = True,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        val_size: int | float = 5000,
        augment: bool = False,
        resize: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        on_device: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, augment, resize, num_workers, split_seed, on_device)
        if not verify_checksums:
            raise ValueError(
                "verify_checksums=False is no longer possible: unpickling a file that is not the official one can "
                "run any code. Remove the option; to use your own CIFAR files, convert them to an image folder."
            )
        self.root = root
        self.download = download

    def _download(self, folder: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(self.url, str(folder), md5=self.archive_md5)

    def locate(self) -> Path:
        """The extracted dataset folder (downloading the archive if allowed and needed)."""
        root = Path(self.root).expanduser() if self.root else None
        required = [f"{self.folder}/{f}" for split in self.files.values() for f in split]
        parent = locate_dataset(
            self.name,
            required,
            [root] if root else [SYSTEM_DIR, CACHE_DIR / "cifar"],
            self._download if self.download else None,
            root or CACHE_DIR / "cifar",
            f"download {self.url}, extract it into a folder and pass that folder as root (--data.root).",
        )
        return parent / self.folder

    def prepare_data(self) -> None:
        self.locate()

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets.utils import check_integrity

        folder = self.locate()
        images, labels = [], []
        for name, md5 in self.files["train" if train else "test"].items():
            path = folder / name
            if not check_integrity(str(path), md5):
                raise ValueError(
                    f"{path} does not match its official MD5 checksum (corrupt, truncated or another file), so it "
                    f"is not unpickled (unpickling can run code). Delete it and download the dataset again."
                )
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                targets = np.asarray(entry[self.label_key], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
                raise ValueError(
                    f"{path} is not a readable {self.name} batch file ({type(err).__name__}: {err})"
                ) from None
            images.append(data)
            labels.append(targets)
        images_t = torch.from_numpy(np.concatenate(images))
        labels_t = torch.from_numpy(np.concatenate(labels))
        if len(images_t) != len(labels_t) or labels_t.min() < 0 or labels_t.max() >= self.num_classes:
            raise ValueError(f"{folder} holds inconsistent {self.name} data (labels outside 0..{self.num_classes - 1})")
        return images_t, labels_t


class CIFAR10DataModule(_CIFARDataModule):
    __doc__ = "CIFAR-10: 10 classes.\n\n" + (_CIFARDataModule.__doc__ or "")
    name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    label_key = "labels"
    files = {
        "train": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        },
        "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
    }


class CIFAR100DataModule(_CIFARDataModule):
    __doc__ = "CIFAR-100: 100 fine classes.\n\n" + (_CIFARDataModule.__doc__ or "")
    name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    label_key = "fine_labels"
    files = {
        "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    }
