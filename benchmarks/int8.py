"""int8 against float32 for trained students: accuracy, file size and latency in ONNX Runtime (issue 14).

    python benchmarks/int8.py --run runs/quickstart          # the quickstart's student, pruned and thin students
    python benchmarks/int8.py --checkpoints a.ckpt b.ckpt --recipe runs/quickstart/student.yaml

For each student checkpoint: the float32 ONNX export, and int8 files from ONNX Runtime's static
quantization (``distill export --int8``'s code, calibrated on 512 training images, augmentation off)
for each calibration method (per-channel weight scales, int8 activations: the defaults), and for
minmax also per-tensor scales and uint8 activations. Accuracy on the full
validation and test splits in ONNX Runtime, file size, and the median latency of a batch of 64 (and
of 1) with all files of one student measured side by side (interleaved rounds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from distill.export import export_onnx
from distill.latency import compare_latency
from distill.quantize import CALIBRATION_METHODS, QuantOptions, calibration_images, onnx_accuracy, quantize_onnx
from distill.recipes import build_datamodule
from students import load_student, read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a quickstart run folder: its student, pruned and thin students")
    parser.add_argument("--checkpoints", nargs="*", type=Path, default=[])
    parser.add_argument(
        "--recipe", type=Path, help="the recipe whose data calibrates and evaluates (default: the run's)"
    )
    parser.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS), choices=list(CALIBRATION_METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    students = {str(path): path for path in args.checkpoints}
    recipe = args.recipe
    if args.run is not None:
        prune = args.run / "prune_distill"
        state = json.loads((prune / "state.json").read_text())
        baselines = {r["student"].split(",")[0]: Path(r["checkpoint"]) for r in state["phases"].values()
                     if r["phase"] == "baseline"}  # fmt: skip
        students = {
            "student (StudentNet 1.0)": args.run / "student" / "best.ckpt",
            "pruned": prune / "best_student.ckpt",
            **baselines,
            **students,
        }
        recipe = recipe or args.run / "student.yaml"
    if not students or recipe is None:
        parser.error("give --run, or --checkpoints with --recipe")
    data = build_datamodule(yaml.safe_load(recipe.read_text()), str(recipe))
    data.setup("fit")
    data.setup("test")
    calibration = calibration_images(data, 512)

    print(f"\nONNX Runtime, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    sizes = f"{len(data.val_set):,} and {len(data.test_set):,} images"
    print(f"accuracy on the full validation and test splits ({sizes}) in ONNX Runtime; latency: median ms\n")
    header = ["student", "file", "KiB", "val acc", "test acc", "Δ test (points)"]
    header += [f"ms b{b}" for b in args.batches] + [f"speed vs fp32 b{b}" for b in args.batches]
    print("| " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * (len(header) - 2))
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkpoint in students.items():
            model = load_student(checkpoint)
            shape = read_checkpoint(checkpoint)["input_shape"]
            files = {"float32": Path(tmp) / f"{len(label)}_{checkpoint.stem}.onnx"}
            export_onnx(model, torch.zeros(1, *shape), files["float32"])
            for method in args.methods:
                variants = {f"int8 {method}": QuantOptions(calibration_method=method)}
                if method == "minmax":  # the default, beside per-tensor scales and uint8 activations
                    variants["int8 minmax, per-tensor"] = QuantOptions(per_channel=False)
                    variants["int8 minmax, uint8 activations"] = QuantOptions(activations="uint8")
                for name, options in variants.items():
                    files[name] = files["float32"].with_suffix(f".{len(files)}.int8.onnx")
                    quantize_onnx(files["float32"], files[name], calibration, options)
            acc = {
                name: (onnx_accuracy(path, data.val_dataloader()), onnx_accuracy(path, data.test_dataloader()))
                for name, path in files.items()
            }
            ms = {b: compare_latency(files, shape, "onnxruntime", b, rounds=args.rounds, repeats=args.repeats)
                  for b in args.batches}  # fmt: skip
            for name, path in files.items():
                delta = 100 * (acc[name][1] - acc["float32"][1])
                kib = path.stat().st_size / 1024
                cells = [label, name, f"{kib:,.0f}", f"{acc[name][0]:.4f}", f"{acc[name][1]:.4f}", f"{delta:+.2f}"]
                cells += [f"{ms[b][name]:.3f}" for b in args.batches]
                cells += [f"{ms[b]['float32'] / ms[b][name]:.2f}x" for b in args.batches]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
