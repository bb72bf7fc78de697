"""The two ONNX exporters of torch, timed in ONNX Runtime side by side: may a timing use the fast one?

    python benchmarks/onnx_exporters.py                  # the table in benchmarks/RESULTS.md (about a minute)
    python benchmarks/onnx_exporters.py --batch-size 1 --rounds 9
    python benchmarks/onnx_exporters.py --models "StudentNet 1.0" test_resnet

``distill.export.export_onnx`` ships students with ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based
exporter, with onnxscript's optimizer: about 2 s a StudentNet). Timings that never ship their file (the pruning
search's candidates, the quickstart's table) use ``distill.latency.export_for_timing``: the TorchScript-based
exporter (``dynamo=False``, about 0.05 s). Both files of each model are timed here in one
:func:`distill.latency.compare_latency` call (interleaved rounds, one ONNX Runtime thread pool), with their
sizes and how long each export took. Models (random weights: speed does not depend on them): StudentNet of the
Fashion-MNIST recipes at width 1.0 and 0.5, a pruned one with odd widths, and the quickstart's and the recipes'
teachers (timm ``test_resnet``, ``resnet18`` with the small-image stem).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distill.export import export_onnx
from distill.latency import compare_latency, export_for_timing
from students import StudentNet, create_timm_model

EXPORTERS = {"dynamo (shipped)": export_onnx, "torchscript (timing)": export_for_timing}


STUDENT = {"in_chans": 1, "num_classes": 10, "num_pools": 3}
MODELS = {  # built when timed
    "StudentNet 1.0": lambda: StudentNet(width_mult=1.0, **STUDENT),
    "StudentNet 0.5": lambda: StudentNet(width_mult=0.5, **STUDENT),
    "StudentNet pruned, odd widths": lambda: StudentNet(channels=[9, 18, 31, 72, 154, 150, 147, 140], **STUDENT),
    "test_resnet": lambda: create_timm_model("test_resnet", num_classes=10, in_chans=1, small_input=True),
    "resnet18, small-image stem": lambda: create_timm_model("resnet18", num_classes=10, in_chans=1, small_input=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    parser.add_argument("--repeats", type=int, default=10, help="calls per file and round")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL",
                        help=f"the models to time (default: all of {', '.join(MODELS)})")  # fmt: skip
    args = parser.parse_args()
    if min(args.batch_size, args.rounds, args.repeats) < 1:
        parser.error(f"need --batch-size, --rounds and --repeats >= 1, got {args.batch_size}, {args.rounds}, "
                     f"{args.repeats}")  # fmt: skip
    x = torch.zeros(1, 1, 28, 28)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files, export_s = {}, {}
        for name in args.models:
            model = MODELS[name]()
            for exporter, export in EXPORTERS.items():
                key = (name, exporter)
                files[key] = Path(tmp) / f"{len(files)}.onnx"
                start = time.perf_counter()
                export(model.eval(), x, files[key])
                export_s[key] = time.perf_counter() - start
        ms = compare_latency({f"{n} | {e}": f for (n, e), f in files.items()}, [1, 28, 28], "onnxruntime",
                             batch_size=args.batch_size, rounds=args.rounds, repeats=args.repeats)  # fmt: skip
        for (name, exporter), path in files.items():
            rows.append(
                (name, exporter, path.stat().st_size / 1024, export_s[name, exporter], ms[f"{name} | {exporter}"])
            )
    print(f"ONNX Runtime, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print("| model | exporter | file KiB | export s | ms | torchscript / dynamo |")
    print("|---|---|---:|---:|---:|---:|")
    shipped = {name: latency for name, exporter, _, _, latency in rows if exporter == "dynamo (shipped)"}
    for name, exporter, kib, seconds, latency in rows:
        ratio = "" if exporter == "dynamo (shipped)" else f"{latency / shipped[name]:.2f}"
        print(f"| {name} | {exporter} | {kib:.0f} | {seconds:.2f} | {latency:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
