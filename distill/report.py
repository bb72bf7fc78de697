"""Writing a job's results into its run directory, safely when several workers share it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "save_figure"]


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a file beside ``path``, then rename it: readers never see half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with open(partial, "w", newline="") as f:
        write(f)
    os.replace(partial, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    partial = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)
