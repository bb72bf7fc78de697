"""The benchmark scripts still run (at a tiny size); their numbers live in benchmarks/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_pruning_speed_prints_its_table():
    args = ["--criteria", "l1", "hrank", "--ratios", "0.5", "--round-to", "1", "--rounds", "1", "--repeats", "1"]
    out = subprocess.run(
        [sys.executable, "benchmarks/pruning_speed.py", *args], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "criterion" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["-", "l1", "hrank"]
    assert "| 50% | 1 | [8, 16, 32, 64, 128, 128, 128, 128] | 68,090 |" in out
