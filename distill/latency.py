"""The one latency function: a student's milliseconds per batch on the runtime it is deployed on.

Runtimes: ONNX Runtime's CPU provider with the float32 export or its int8 quantization
(:mod:`distill.quantize`), eager PyTorch on the CPU or on CUDA. Students are measured side by side, in
interleaved rounds, and the median is reported: the machines this runs on are noisy, and a ratio of two
students measured together is worth more than either figure alone.
"""

from __future__ import annotations

import copy
import json
import numbers
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.export import export_onnx
from distill.ort_timer import interleaved
from distill.quantize import quantize_onnx, require_onnxruntime
from students.checkpoint import checked_input_shape
from students.modes import eval_mode

__all__ = [
    "REFERENCE",
    "RUNTIMES",
    "LatencyMeter",
    "check_runtime",
    "compare_latency",
    "export_for_timing",
    "measure_latency",
    "relative_to",
]

#: Where a student's latency is measured (``runtime`` of :func:`measure_latency`).
RUNTIMES = ("onnxruntime", "onnxruntime-int8", "torch-cpu", "torch-cuda")


def check_timing(
    input_shape: Sequence[int], runtime: str, batch_size: int, threads: int | None, warmup: int, rounds: int,
    repeats: int,
) -> None:  # fmt: skip
    """Refuse, in one line, settings :func:`compare_latency` cannot time with (whole numbers where it counts)."""
    counts = {"batch_size": batch_size, "warmup": warmup, "rounds": rounds, "repeats": repeats,
              **({} if threads is None else {"threads": threads})}  # fmt: skip
    checked_input_shape(input_shape)
    if not all(_whole(v) for v in counts.values()):
        raise ValueError(f"{', '.join(counts)} must be whole numbers, got {counts}")
    check_runtime(runtime, batch_size)
    if warmup < 0 or rounds < 1 or repeats < 1 or (threads is not None and threads < 1):
        raise ValueError(
            f"need rounds, repeats (and threads, if given) >= 1 and warmup >= 0; got {rounds}, {repeats}, {threads}, "
            f"{warmup}"
        )


def _whole(n: Any) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def check_runtime(
    runtime: str, batch_size: int, option: str = "latency runtime", batch_option: str = "batch_size"
) -> None:
    """Refuse a runtime or batch size that cannot be measured on this machine (``option``: its name in messages)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown {option} {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if batch_size < 1:
        raise ValueError(f"{batch_option} must be >= 1, got {batch_size}")
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{option} 'torch-cuda' needs a CUDA GPU; this machine has none (use onnxruntime or torch-cpu)"
        )
    if runtime.startswith("onnxruntime"):
        require_onnxruntime()


def measure_latency(
    model: nn.Module | str | Path,
    input_shape: Sequence[int],
    runtime: str = "onnxruntime",
    batch_size: int = 64,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
) -> float:
    """Median milliseconds of one forward of a ``batch_size`` batch on ``runtime``, over ``repeats`` calls.

    One model: each call is its own round of :func:`compare_latency`, so the figure is a median of calls.
    """
    return compare_latency({"model": model}, input_shape, runtime, batch_size, threads, warmup, repeats, 1)["model"]


def compare_latency(
    models: Mapping[str, nn.Module | str | Path],
    input_shape: Sequence[int],
    runtime: str = "onnxruntime",
    batch_size: int = 64,
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 5,
    repeats: int = 10,
) -> dict[str, float]:
    """Median milliseconds per forward of each model, measured side by side on one runtime.

    Each of ``rounds`` rounds times ``repeats`` back-to-back calls of every model in turn, so that
    machine noise hits every model alike; the figure is the median over rounds of the time per call.

    Args:
        models: eager modules, or ONNX files for the ``onnxruntime`` runtimes. A module given to
            ``onnxruntime`` is exported first; to ``onnxruntime-int8``, exported and quantized with
            random calibration inputs (speed does not depend on the weights or the scales). A file is timed as
            it is under either: give the int8 file itself (``distill export --int8``) to time int8.
        input_shape: ``[channels, height, width]`` of one image.
        runtime: ``onnxruntime`` (float32 ONNX in ONNX Runtime's CPU provider), ``onnxruntime-int8``
            (the same model quantized, :mod:`distill.quantize`), ``torch-cpu`` (eager float32) or
            ``torch-cuda`` (eager float32 on the GPU, synchronised).
        batch_size: images per forward.
        threads: CPU threads (default: ``torch.get_num_threads()``). ONNX Runtime's sessions run in a child
            process, all in one pool of that many threads (:mod:`distill.ort_timer`), which spin while waiting
            for work as ORT's default does (1.6x faster at batch 64 on a 2-core CPU than without): a model
            times the same alone or beside others.
        warmup: untimed calls of each model first (ONNX Runtime's first runs, cuDNN's autotuning).
        rounds: interleaved rounds.
        repeats: calls per model and round.
    """
    check_timing(input_shape, runtime, batch_size, threads, warmup, rounds, repeats)
    input_shape = checked_input_shape(input_shape)  # Python ints: numpy's do not go into the child's JSON
    threads = threads or torch.get_num_threads()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    if runtime.startswith("onnxruntime"):
        with tempfile.TemporaryDirectory() as tmp:
            files = {name: str(_onnx_file(m, runtime, x, Path(tmp) / f"{i}.onnx")) for i, (name, m) in
                     enumerate(models.items())}  # fmt: skip
            request = {"files": files, "input_shape": list(input_shape), "batch_size": batch_size, "threads": threads,
                       "warmup": warmup, "rounds": rounds, "repeats": repeats}  # fmt: skip
            return _in_child(request)
    device = "cuda" if runtime == "torch-cuda" else "cpu"
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise ValueError(f"runtime {runtime!r} measures a PyTorch module, got the file {m} for {name!r}")
    moved = {name: copy.deepcopy(m).to(device).eval() for name, m in models.items()}  # the caller's stay put
    xd = x.to(device)
    calls = {name: (lambda m=m: m(xd)) for name, m in moved.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            sync = torch.cuda.synchronize if runtime == "torch-cuda" else (lambda: None)
            return interleaved(calls, warmup, rounds, repeats, sync, pause=0.02)  # in-process: see RESULTS.md
    finally:
        torch.set_num_threads(previous)


def _in_child(request: dict) -> dict[str, float]:
    """Time ONNX files in a child process (:mod:`distill.ort_timer`: one thread pool for all its sessions)."""
    script = Path(__file__).with_name("ort_timer.py")
    done = subprocess.run([sys.executable, str(script)], input=json.dumps(request), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"ONNX Runtime could not time the models: {last}")
    return json.loads(done.stdout)


@dataclass(frozen=True)
class LatencyMeter:
    """Where and how students are timed: a runtime, a batch size, threads, and the rounds of
    :func:`compare_latency`. Call it with named models to time them side by side.

    The pruning search (:func:`distill.pruning.prune_student` with ``target_latency_ms``) takes one, so that
    the layers above this one choose the runtime and the pruning code never imports it.
    """

    input_shape: tuple[int, ...]
    runtime: str = "onnxruntime"
    batch_size: int = 64
    threads: int | None = None
    warmup: int = 5
    rounds: int = 15  # ratios of StudentNets spread alike at 5 and 15 on a noisy VM (RESULTS.md, "Timing rounds")
    repeats: int = 10

    def __post_init__(self) -> None:
        check_timing(
            self.input_shape, self.runtime, self.batch_size, self.threads, self.warmup, self.rounds, self.repeats
        )  # fmt: skip  (else at its first timing, deep in a search)
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def __call__(self, models: Mapping[str, nn.Module | str | Path]) -> dict[str, float]:
        """Median milliseconds per batch of each model, measured side by side."""
        return compare_latency(models, self.input_shape, self.runtime, self.batch_size, self.threads, self.warmup,
                               self.rounds, self.repeats)  # fmt: skip

    def describe(self) -> str:
        """E.g. ``onnxruntime, batch 64, 2 threads``."""
        return f"{self.runtime}, batch {self.batch_size}, {self.threads or torch.get_num_threads()} threads"


#: The reference's name in :func:`relative_to`'s calls (a space: no module path has one).
REFERENCE = "reference model"


def relative_to(
    measure: Callable[[Mapping[str, nn.Module]], Mapping[str, float]], reference: nn.Module, reference_ms: float
) -> Callable[[Mapping[str, nn.Module]], dict[str, float]]:
    """``measure`` with ``reference`` timed beside the models in every call, and their milliseconds scaled by
    ``reference_ms`` over the reference's time in that call.

    A target that is a fraction of a student's time (prune-distill's ``target_latency``) is then compared with
    the student timed in the same rounds, not with one earlier timing of it: on a shared CPU a slow phase lasts
    minutes and reads every model up to 3-4x slower, so a target fixed in milliseconds from a quiet check
    could not be met in a slow phase, and one fixed in a slow phase asked for almost no pruning. A busy moment
    that falls on the reference's calls now lowers a reading, where the search assumes that one only adds time:
    measured, searches for 0.75 of the start landed at 0.66-0.74 of it (RESULTS.md, "A fraction of the start").
    """

    def timed(models: Mapping[str, nn.Module]) -> dict[str, float]:
        if REFERENCE in models:
            raise ValueError(f"{REFERENCE!r} names the reference model; name the models otherwise")
        ms = measure({REFERENCE: reference, **models})
        return {name: ms[name] * reference_ms / ms[REFERENCE] for name in models}

    return timed


def export_for_timing(model: nn.Module, x: torch.Tensor, path: str | Path) -> None:
    """Write ``model`` as ONNX to be timed: TorchScript-based export (0.05 s for a StudentNet, against 1.6 s
    for ``torch.export``; the pruning search times dozens of candidates). Both graphs ran alike in ONNX
    Runtime (``benchmarks/onnx_exporters.py``, RESULTS.md); where the older exporter is gone or fails, the shipping
    export is used."""
    model = copy.deepcopy(model).cpu()  # the caller's module stays where it is
    try:
        with warnings.catch_warnings(), eval_mode(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"],
                              dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    except Exception:  # noqa: BLE001  (any failure of the fast path: take the shipping one)
        export_onnx(model, x, path)


def _onnx_file(model: nn.Module | str | Path, runtime: str, x: torch.Tensor, path: Path) -> Path:
    """The ONNX file to time for ``model``: the file itself, or the module exported (and quantized for
    ``onnxruntime-int8``, with random calibration inputs: speed does not depend on the weights or the scales)."""
    require_onnxruntime()
    if not isinstance(model, nn.Module):
        return Path(model)
    export_for_timing(model, x[:1], path)
    if runtime == "onnxruntime-int8":
        calibration = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(4)]
        return quantize_onnx(path, path.with_suffix(".int8.onnx"), calibration)
    return path
