"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60k/10k 28x28 grayscale images of 10 clothing classes."""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import check_integrity, download_url

from distill.data.locate import LocatedDataModule

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


class FashionMNISTDataModule(LocatedDataModule):
    """Fashion-MNIST, the embedded default dataset (10 classes, 1 channel, 28x28; random crops pad by 2).

    The four IDX ``.gz`` files are looked for in ``root`` (or ``root/FashionMNIST/raw``) when it is given,
    and only there; else in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``),
    then ``~/.cache/distill/fashion-mnist``. Missing files are downloaded from the official URLs (into
    ``root``, or the cache) and checked against their MD5s. The arguments are those of
    :class:`~distill.data.locate.LocatedDataModule` and :class:`~distill.data.memory.InMemoryDataModule`.
    """

    num_classes = 10
    in_chans = 1
    native_size = 28
    mean = (0.2860,)
    std = (0.3530,)
    crop_padding = 2
    classes = CLASSES
    dataset_name = "Fashion-MNIST"
    required_files = tuple(FASHION_MNIST_FILES)
    system_dir = SYSTEM_DIR
    cache_name = "fashion-mnist"
    root_subdirs = (".", "FashionMNIST/raw")
    how_to_get = (
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four .gz files from "
        f"{FASHION_MNIST_URL} into a folder and pass it as root (--data.root)."
    )

    def fetch(self, folder: Path) -> None:
        for name, md5 in FASHION_MNIST_FILES.items():
            download_url(FASHION_MNIST_URL + name, str(folder), filename=name, md5=md5)
            if not check_integrity(str(folder / name), md5):
                raise RuntimeError(f"{folder / name} failed its MD5 check")

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
