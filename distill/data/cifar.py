"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 RGB images, downloaded and read by torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from distill.data.locate import LocatedDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]

SYSTEM_DIR = Path("/usr/share/datasets")


class _CIFARDataModule(LocatedDataModule):
    """Shared loading for CIFAR-10/100, through ``torchvision.datasets.CIFAR10`` / ``CIFAR100``.

    The extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) is looked for under ``root`` when
    it is given, and only there; else under ``/usr/share/datasets`` and ``~/.cache/distill/cifar``. A
    missing copy is downloaded by torchvision and checked against its MD5. torchvision checks every
    pickle file against its official MD5 before it unpickles any: unpickling runs whatever code a file
    asks for, so a file that is not the official one is never opened. The other arguments are those of
    :class:`~distill.data.locate.LocatedDataModule` and :class:`~distill.data.memory.InMemoryDataModule`.

    Args:
        verify_checksums: kept so that configs saved before still load; must be true (the check is always on).
    """

    in_chans = 3
    native_size = 32
    crop_padding = 4
    system_dir = SYSTEM_DIR
    cache_name = "cifar"
    torchvision_class: type[CIFAR10]

    def __init__(
        self, root: str | None = None, download: bool = True, verify_checksums: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(root, download, **kwargs)
        if not verify_checksums:
            raise ValueError(
                "verify_checksums=False is no longer possible: unpickling a file that is not the official one can "
                "run any code. Remove the option; to use your own CIFAR files, convert them to an image folder."
            )

    @property
    def dataset_name(self) -> str:
        return f"CIFAR-{self.num_classes}"

    @property
    def required_files(self) -> tuple[str, ...]:
        tv = self.torchvision_class
        names = [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
        return tuple(f"{tv.base_folder}/{name}" for name in names)

    @property
    def how_to_get(self) -> str:
        url = self.torchvision_class.url
        return f"download {url}, extract it into a folder and pass that folder as root (--data.root)."

    def fetch(self, folder: Path) -> None:
        self.torchvision_class(str(folder), train=False, download=True)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.locate()
        try:
            split = self.torchvision_class(str(root), train=train, download=False)
        except RuntimeError:  # the files are there (locate found them): their checksums differ
            raise ValueError(
                f"{root / self.torchvision_class.base_folder} does not match its official MD5 checksums (corrupt, "
                "truncated or other files), so none of it is unpickled (unpickling can run code). Delete it and "
                "download the dataset again."
            ) from None
        self.classes = list(split.classes)  # read from the dataset's meta file
        images = np.ascontiguousarray(split.data.transpose(0, 3, 1, 2))  # torchvision's (N, H, W, C) -> (N, C, H, W)
        return torch.from_numpy(images), torch.tensor(split.targets, dtype=torch.int64)


class CIFAR10DataModule(_CIFARDataModule):
    __doc__ = "CIFAR-10: 10 classes.\n\n" + (_CIFARDataModule.__doc__ or "")
    torchvision_class = CIFAR10
    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    __doc__ = "CIFAR-100: 100 fine classes.\n\n" + (_CIFARDataModule.__doc__ or "")
    torchvision_class = CIFAR100
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
