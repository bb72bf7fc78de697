"""Writing a job's results into its run directory, safely when several workers share it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "save_figure"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A partial file beside ``path`` to write; renamed onto ``path`` only if the block succeeds.

    Readers never see half a file, and a write that fails leaves an existing ``path`` as it was.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")  # unique across hosts
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a text file beside ``path``, then rename it onto ``path``."""
    with atomic_path(path) as partial, open(partial, "w", newline="") as f:
        write(f)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)
