"""Finding dataset files: the given root, the system's copy, then a checksummed download."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["CACHE_DIR", "locate_dataset"]

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
