"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60k/10k 28x28 grayscale images of 10 clothing classes."""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from distill.data.locate import CACHE_DIR, locate_dataset
from distill.data.memory import InMemoryDataModule

__all__ = ["FASHION_MNIST_FILES", "FashionMNISTDataModule", "read_idx"]

#: The official files and their MD5 checksums (as published by Zalando and used by torchvision).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Debian's ``dataset-fashion-mnist`` package installs the files here.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLITS = {True: ("train", 60000), False: ("t10k", 10000)}


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes, with clear errors for damaged files."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}). Delete it and fetch it again.") from None
    if len(data) < 4 + 4 * expected_ndim:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, too short for an IDX header.")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {expected_ndim} dimensions "
            f"(header {data[:4].hex()}). Is it the right file?"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated or padded: header says {shape}, file holds {len(body)} bytes of data.")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _download(folder: Path) -> None:
    from torchvision.datasets.utils import check_integrity, download_url

    for name, md5 in FASHION_MNIST_FILES.items():
        download_url(FASHION_MNIST_URL + name, str(folder), filename=name, md5=md5)
        if not check_integrity(str(folder / name), md5):
            raise RuntimeError(f"{folder / name} failed its MD5 check")


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST, the embedded default dataset (10 classes, 1 channel, 28x28).

    The four IDX ``.gz`` files are looked for in ``root`` (or ``root/FashionMNIST/raw``) when it is given,
    and only there; else in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``),
    then ``~/.cache/distill/fashion-mnist``. Missing files are downloaded from the official URLs (into
    ``root``, or the cache) and checked against their MD5s.

    Args:
        root: folder with the four files, the only place looked when given (and the download target).
        download: allow the download when no copy is found.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: validation images taken out of the 60,000 training images (count, or fraction).
        augment: random crop (padding 2) and horizontal flip on the training split.
        resize: resize to ``resize`` x ``resize`` (e.g. 32, or 224 for ImageNet-sized teachers).
        num_workers: DataLoader worker processes.
        split_seed: seed of the train/validation split.
        on_device: keep the splits on the GPU and build batches there (``None``: when training on a GPU
            and they fit in a quarter of its free memory; ``False``: CPU memory and DataLoaders).
    """

    num_classes = 10
    in_chans = 1
    native_size = 28
    mean = (0.2860,)
    std = (0.3530,)
    crop_padding = 2
    classes = CLASSES

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
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
        self.root = root
        self.download = download

    def locate(self) -> Path:
        """The folder holding the four files (downloading them if allowed and needed)."""
        root = Path(self.root).expanduser() if self.root else None
        candidates = [root, root / "FashionMNIST" / "raw"] if root else [SYSTEM_DIR, CACHE_DIR / "fashion-mnist"]
        return locate_dataset(
            "Fashion-MNIST",
            list(FASHION_MNIST_FILES),
            candidates,
            _download if self.download else None,
            root or CACHE_DIR / "fashion-mnist",
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four .gz files from "
            f"{FASHION_MNIST_URL} into a folder and pass it as root (--data.root).",
        )

    def prepare_data(self) -> None:
        self.locate()

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _read_split(self.locate(), train)


@lru_cache(maxsize=4)
def _read_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split once per process (sweeps and tests build many datamodules)."""
    prefix, count = _SPLITS[train]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1)
    if len(images) != count or len(labels) != count or images.shape[1:] != (28, 28):
        raise ValueError(
            f"Fashion-MNIST {prefix} files in {folder} hold {len(images)} images of {images.shape[1:]} and "
            f"{len(labels)} labels; expected {count} of (28, 28). Replace them with the official files."
        )
    if labels.max() >= len(CLASSES):
        raise ValueError(f"Fashion-MNIST labels in {folder} go up to {labels.max()}; expected 0..9.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
