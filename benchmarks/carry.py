"""Carry finished recipes from one GPU call to the next, in files small enough to come back from ``$OUT``.

A GPU call starts on a bare machine and sends back at most 8 files of at most 16 MiB each (the project's
device tool, ``/work/.library/device/README.md``). The teacher's ``best.ckpt`` (45 MB of float32 weights, twice
that with its optimizer state) did not come back, so every call trained the teacher again, about 2.5 of a
session's 15 minutes, and each session's students learned from a different teacher.

``pack`` writes a finished recipe's ``best.ckpt`` without what only resuming its training needs (optimizer and
scheduler states; its epoch, best score and hyper-parameters stay), with ``--half`` its weight matrices and
kernels in float16 (the GPU runs them in bfloat16, which keeps fewer mantissa bits), in parts named
``<recipe>.ckpt.<hash>.<i>-of-<n>`` (the hash: 8 hex digits of the packed file's SHA-256). ``unpack`` joins a
folder's parts back into ``runs/fmnist/<recipe>/best.ckpt`` and marks the recipe finished, so
``benchmarks/gpu_numbers.sh`` does not train it again. It checks every recipe first (all its parts, of one
packing, joined into the file packed, a checkpoint) and writes nothing if any fails.

    python benchmarks/carry.py pack "$OUT" teacher --half    # on the GPU machine: gpu_numbers.sh does it
    cp <the call's files_at>/*.ckpt.*-of-* .data/carry/       # here, then carry .data with the next call
    python benchmarks/carry.py unpack .data/carry             # there: gpu_numbers.sh does it first
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

from distill.rundir import atomic_path
from students.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: What only resuming a fit needs: dropped by ``pack``.
RESUME_ONLY = ("optimizer_states", "lr_schedulers")
#: Below the device tool's 16 MiB per returned file.
PART_MIB = 15
_RECIPE = re.compile(r"[A-Za-z0-9_]+")
_PART = re.compile(r"(?P<recipe>[A-Za-z0-9_]+)\.ckpt\.(?P<hash>[0-9a-f]{8})\.(?P<i>[0-9]+)-of-(?P<n>[0-9]+)")


def packed_bytes(checkpoint: dict, half: bool) -> bytes:
    """``checkpoint`` without :data:`RESUME_ONLY`, with ``half`` its floating tensors of 2+ dimensions in float16."""
    slim = {k: v for k, v in checkpoint.items() if k not in RESUME_ONLY}
    if half:
        slim["state_dict"] = {
            k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in slim["state_dict"].items()
        }
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    return buffer.getvalue()


def pack(out: Path, recipes: list[str], half: bool, runs: Path, part_mib: float = PART_MIB) -> list[Path]:
    """Write each finished recipe's checkpoint into ``out`` as parts of at most ``part_mib`` MiB."""
    for recipe in recipes:
        if not _RECIPE.fullmatch(recipe):
            raise SystemExit(f"recipe names are letters, digits and '_' (they name the parts), got {recipe!r}")
        if not (runs / recipe / "finished").is_file():
            raise SystemExit(f"{recipe} is not finished ({runs / recipe / 'finished'} is missing): train it first")
    size = int(part_mib * 2**20)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        data = packed_bytes(read_checkpoint(runs / recipe / "best.ckpt"), half)
        for old in out.glob(f"{recipe}.ckpt.*-of-*"):
            old.unlink()
        n, digest = math.ceil(len(data) / size), hashlib.sha256(data).hexdigest()[:8]
        for i in range(n):
            path = out / f"{recipe}.ckpt.{digest}.{i + 1}-of-{n}"
            path.write_bytes(data[i * size : (i + 1) * size])
            written.append(path)
    return written


def compare(original: Path, carried: Path) -> str:
    """How far the carried checkpoint's predictions are from the original's on the test split, beside how far the
    original's own move under bfloat16 autocast (how the GPU runs the teacher)."""
    from distill.data import FashionMNISTDataModule
    from teachers import load_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = FashionMNISTDataModule(batch_size=1000)
    data.setup("test")
    models = [load_teacher(checkpoint=path).to(device) for path in (original, carried)]
    logits: list[list[torch.Tensor]] = [[], [], []]
    labels = []
    with torch.no_grad():
        for x, y, *_ in data.test_dataloader():
            x = x.to(device)
            logits[0].append(models[0](x).float())
            logits[1].append(models[1](x).float())
            with torch.autocast(device, dtype=torch.bfloat16):
                logits[2].append(models[0](x).float())
            labels.append(y.to(device))
    (full, half, bf16), y = (torch.cat(z) for z in logits), torch.cat(labels)
    differ = [int((z.argmax(1) != full.argmax(1)).sum()) for z in (half, bf16)]
    gaps = [float((z - full).abs().max()) for z in (half, bf16)]
    return (
        f"{len(y)} test images: accuracy {float((full.argmax(1) == y).float().mean()):.4f} as trained, "
        f"{float((half.argmax(1) == y).float().mean()):.4f} carried; {differ[0]} predictions differ, logits at most "
        f"{gaps[0]:.1e} apart (up to {float(full.abs().max()):.1f}); under bfloat16 autocast ({device}) "
        f"{differ[1]} differ, {gaps[1]:.1e} apart"
    )


def _groups(folder: Path) -> dict[str, tuple[str, list[Path]]]:
    """The hash and the parts, in order, of each recipe in ``folder``; refuses a recipe whose parts are not all
    those of one packing."""
    found: dict[str, set[tuple[str, int, int]]] = {}
    paths = {}
    for path in folder.iterdir():
        match = _PART.fullmatch(path.name)
        if match:
            key = (match["hash"], int(match["i"]), int(match["n"]))
            found.setdefault(match["recipe"], set()).add(key)
            paths[match["recipe"], key] = path
    groups = {}
    for recipe, keys in sorted(found.items()):
        digest, _, n = min(keys)
        if keys != {(digest, i, n) for i in range(1, n + 1)}:
            names = ", ".join(sorted(paths[recipe, k].name for k in keys))
            raise SystemExit(
                f"{folder}: the parts of {recipe}.ckpt are not those of one packing ({names}): copy all the parts one "
                f"call returned, and only those"
            )
        groups[recipe] = (digest, [paths[recipe, (digest, i, n)] for i in range(1, n + 1)])
    return groups


def unpack(folder: Path, runs: Path, only: str | None = None) -> list[str]:
    """Join the parts in ``folder`` into ``runs/<recipe>/best.ckpt`` of every recipe (or ``only`` one) not finished
    there yet."""
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder of packed parts")
    joined = {}
    for recipe, (digest, parts) in _groups(folder).items():
        if (runs / recipe / "finished").is_file() or only not in (None, recipe):
            continue  # trained or unpacked on this machine already: kept
        data = b"".join(p.read_bytes() for p in parts)
        if hashlib.sha256(data).hexdigest()[:8] != digest:
            raise SystemExit(f"{folder}: the parts of {recipe}.ckpt do not join into the file packed (hash {digest})")
        with tempfile.NamedTemporaryFile(suffix=".ckpt") as check:
            check.write(data)
            check.flush()
            try:
                if "state_dict" not in read_checkpoint(check.name):
                    raise ValueError("it holds no state_dict")
            except ValueError as err:
                raise SystemExit(f"{folder}: the parts of {recipe}.ckpt do not make a checkpoint: {err}") from None
        joined[recipe] = data
    for recipe, data in joined.items():  # all checked: now write
        run = runs / recipe
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(run / "best.ckpt") as partial:
            partial.write_bytes(data)
        (run / "finished").touch()
    return list(joined)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "fmnist", help="where the recipes' runs are")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write finished recipes' checkpoints into OUT, in parts")
    p.add_argument("out", type=Path)
    p.add_argument("recipes", nargs="+", help="e.g. teacher kd (each must be finished: runs/fmnist/<recipe>/finished)")
    p.add_argument("--half", action="store_true", help="weights of 2+ dimensions in float16 (the teacher: 22 MB)")
    p.add_argument("--part-mib", type=float, default=PART_MIB, help=f"largest part, MiB (default {PART_MIB})")
    p.add_argument("--check", action="store_true", help="compare the packed teacher with it on the test split")
    u = sub.add_parser("unpack", help="join the parts in FOLDER into runs/fmnist/<recipe>/best.ckpt")
    u.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        for path in pack(args.out, args.recipes, args.half, args.runs, args.part_mib):
            print(f"packed {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        for recipe in args.recipes if args.check else []:
            with tempfile.TemporaryDirectory() as tmp:
                unpack(args.out, Path(tmp), only=recipe)
                print(f"{recipe}: {compare(args.runs / recipe / 'best.ckpt', Path(tmp) / recipe / 'best.ckpt')}")
    else:
        recipes = unpack(args.folder, args.runs)
        none = "nothing (every recipe there is finished here)" if _groups(args.folder) else "nothing (no parts there)"
        print(f"unpacked {', '.join(recipes) or none} into {args.runs}")


if __name__ == "__main__":
    sys.exit(main())
