"""Student inference latency at several widths and pruned sizes: CPU PyTorch, ONNX Runtime, GPU (issue 6).

    python benchmarks/latency.py                       # every backend found on this machine
    python benchmarks/latency.py --batches 1 --backends torch-cpu --rounds 2   # a quick look

Students: StudentNet of the Fashion-MNIST recipes (10 classes, 1x28x28, ``num_pools=3``) at
``width_mult`` 1.0, 0.75, 0.5, 0.25, and the width-1.0 net pruned with ``l1`` to 100k and 50k
parameters (global ranking, as ``distill prune-distill`` does). Weights are random: latency does
not depend on them. For each: parameters, MACs per image, and the median latency of one forward
in milliseconds at each batch size, on

- ``torch-cpu``: eager PyTorch, float32, ``torch.get_num_threads()`` threads;
- ``ort-cpu``: the ONNX export (``distill export``'s exporter) in ONNX Runtime's CPU provider, as many
  threads as PyTorch, no spinning between runs;
- ``torch-gpu``: eager PyTorch on CUDA, float32 and bf16 autocast, channels-last.

Each measurement is the median over ``--rounds`` interleaved rounds of ``--repeats`` calls, so
machine noise hits every model alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distill.export import export_onnx
from distill.profile import count_macs, count_params
from distill.pruning import PruningPolicy, prune_student
from students import StudentNet

SHAPE = (1, 28, 28)


def students(targets: list[int]) -> dict[str, torch.nn.Module]:
    models = {}
    for width in (1.0, 0.75, 0.5, 0.25):
        torch.manual_seed(0)
        models[f"width {width}"] = StudentNet(num_classes=10, in_chans=1, width_mult=width, num_pools=3).eval()
    for target in targets:
        torch.manual_seed(0)
        model = StudentNet(num_classes=10, in_chans=1, num_pools=3).eval()
        prune_student(model, torch.zeros(1, *SHAPE), PruningPolicy("l1", global_ranking=True), target_params=target)
        models[f"pruned to {target // 1000}k"] = model.eval()
    return models


def runners(model: torch.nn.Module, backend: str, batch: int, workdir: Path) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per precision, that run one forward of ``model`` on ``backend``."""
    x = torch.randn(batch, *SHAPE)
    if backend == "torch-cpu":
        return {"fp32": lambda: model(x)}
    if backend == "ort-cpu":
        import onnxruntime as ort

        path = workdir / f"{id(model)}.onnx"
        if not path.is_file():
            export_onnx(model, torch.zeros(1, *SHAPE), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # ORT's threads spin after each run by default, stealing the cores from the PyTorch runs interleaved here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name, feed = session.get_inputs()[0].name, x.numpy()
        return {"fp32": lambda: session.run(None, {name: feed})}
    gpu = copy.deepcopy(model).to("cuda", memory_format=torch.channels_last)  # the CPU runs keep the original
    xg = x.to("cuda").contiguous(memory_format=torch.channels_last)

    def bf16() -> object:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return gpu(xg)

    return {"fp32": lambda: gpu(xg), "bf16": bf16}


@torch.no_grad()
def measure(run: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Milliseconds per call, over ``repeats`` back-to-back calls (synchronised on the GPU)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = ["torch-cpu"]
    try:
        import onnxruntime  # noqa: F401

        available.append("ort-cpu")
    except ImportError:
        pass
    if torch.cuda.is_available():
        available.append("torch-gpu")
    parser.add_argument("--backends", nargs="+", default=available, choices=("torch-cpu", "ort-cpu", "torch-gpu"))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--targets", nargs="*", type=int, default=[100_000, 50_000], help="pruned sizes (params)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    models = students(args.targets)
    columns = [
        (b, batch, p)
        for b in args.backends
        for batch in args.batches
        for p in (["fp32", "bf16"] if b == "torch-gpu" else ["fp32"])
    ]
    times: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        calls = {}
        for label, model in models.items():
            for backend in args.backends:
                for batch in args.batches:
                    for precision, run in runners(model, backend, batch, Path(tmp)).items():
                        calls[(label, backend, batch, precision)] = run
        with torch.no_grad():
            for run in calls.values():  # warm-up: cuDNN autotuning, ORT's first run
                for _ in range(3):
                    run()
        for _ in range(args.rounds):
            for key, run in calls.items():
                times.setdefault(key, []).append(measure(run, args.repeats, key[1] == "torch-gpu"))

    gpu = f", GPU {torch.cuda.get_device_name()}" if "torch-gpu" in args.backends else ""
    print(f"\nCPU threads {torch.get_num_threads()}{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("latency in ms per forward (median of rounds); MACs per image\n")
    header = " | ".join(f"{b} b{batch} {p}" for b, batch, p in columns)
    print(f"| student | params | MACs | {header} |")
    print("|---|---:|---:|" + "---:|" * len(columns))
    for label, model in models.items():
        cells = " | ".join(f"{statistics.median(times[(label, b, batch, p)]):.3f}" for b, batch, p in columns)
        print(f"| {label} | {count_params(model):,} | {count_macs(model, torch.zeros(1, *SHAPE)):,} | {cells} |")


if __name__ == "__main__":
    main()
