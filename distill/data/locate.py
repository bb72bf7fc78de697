"""Finding dataset files: the given root, the system's copy, then a checksummed download."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.data.memory import InMemoryDataModule

__all__ = ["CACHE_DIR", "LocatedDataModule", "locate_dataset"]

#: Where downloads go when no ``root`` is given.
CACHE_DIR = Path.home() / ".cache" / "distill"


def locate_dataset(
    name: str,
    required: Sequence[str],
    candidates: Sequence[Path],
    download: Callable[[Path], None] | None,
    download_dir: Path,
    how_to_get: str,
) -> Path:
    """The first folder in ``candidates`` holding every file in ``required``, else a fresh download.

    Args:
        name: dataset name, for messages.
        required: file names (relative to the folder) that must all exist.
        candidates: folders to look in, in order.
        download: fetches the files into a folder and checks their checksums; ``None`` to never download.
        download_dir: where to download.
        how_to_get: one sentence telling the user how to get the files by hand.

    Raises:
        FileNotFoundError: naming every place that was tried and how to get the files.
    """
    tried = []
    for folder in candidates:
        if all((folder / f).is_file() for f in required):
            return folder
        tried.append(f"{folder} (no {', '.join(f for f in required if not (folder / f).is_file())})")
    if download is not None:
        try:
            download(download_dir)
            if all((download_dir / f).is_file() for f in required):
                return download_dir
            tried.append(f"download into {download_dir} (finished but files are missing)")
        except Exception as err:  # noqa: BLE001 - any network/disk/checksum failure is reported below
            tried.append(f"download into {download_dir} ({type(err).__name__}: {err})")
    else:
        tried.append("download (disabled: download=False)")
    raise FileNotFoundError(f"{name} was not found. Looked in: {'; '.join(tried)}. To get it: {how_to_get}")


class LocatedDataModule(InMemoryDataModule):
    """An in-memory datamodule read from files that :meth:`locate` finds, or downloads.

    Subclasses set ``dataset_name``, ``required_files``, ``system_dir``, ``cache_name``, ``how_to_get``
    (and ``root_subdirs``, the folders under a given root to look in) and implement :meth:`fetch`.

    Args:
        root: folder holding the dataset's files, the only place looked when given (and the download
            target); else the system's copy (``system_dir``), then ``~/.cache/distill/<cache_name>``.
        download: allow a download (checked against the official MD5s) when no copy is found.
        kwargs: the settings of :class:`~distill.data.memory.InMemoryDataModule`.
    """

    dataset_name: str
    required_files: Sequence[str]
    system_dir: Path
    cache_name: str
    how_to_get: str
    root_subdirs: Sequence[str] = (".",)

    def __init__(self, root: str | None = None, download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def fetch(self, folder: Path) -> None:
        """Download the files into ``folder`` and check them against their official MD5s."""
        raise NotImplementedError

    def locate(self) -> Path:
        """The folder holding ``required_files`` (downloading them if allowed and needed)."""
        root = Path(self.root).expanduser() if self.root else None
        cache = CACHE_DIR / self.cache_name
        return locate_dataset(
            self.dataset_name,
            self.required_files,
            [root / sub for sub in self.root_subdirs] if root else [self.system_dir, cache],
            self.fetch if self.download else None,
            root or cache,
            self.how_to_get,
        )

    def prepare_data(self) -> None:
        self.locate()
