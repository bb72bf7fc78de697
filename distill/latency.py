"""The one latency function: a student's milliseconds per batch on the runtime it is deployed on.

Runtimes: ONNX Runtime's CPU provider with the float32 export or its int8 quantization
(:mod:`distill.quantize`), eager PyTorch on the CPU or on CUDA. Students are measured side by side, in
interleaved rounds, and the median is reported: the machines this runs on are noisy, and a ratio of two
students measured together is worth more than either figure alone.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.export import export_onnx
from distill.profile import eval_mode
from distill.quantize import quantize_onnx, require_onnxruntime

__all__ = ["CHANNEL_MULTIPLE", "RUNTIMES", "LatencyMeter", "check_runtime", "compare_latency", "measure_latency"]

#: Where a student's latency is measured (``runtime`` of :func:`measure_latency`).
RUNTIMES = ("onnxruntime", "onnxruntime-int8", "torch-cpu", "torch-cuda")

#: Kept channel counts are rounded to a multiple of this by default (``round_to`` of the pruning jobs).
#: Measured (``benchmarks/channel_multiple.py``, RESULTS.md): in ONNX Runtime's CPU provider on AVX-512, a
#: StudentNet whose middle layers have 112-144 channels ran 3.5-4.1x slower at every count that is not a
#: multiple of 4 (such convolutions fall out of its NCHWc layout), and multiples of 4, 8 and 16 ran alike.
#: 8 leaves a margin: AVX2's NCHWc blocks are 8 channels, and tensor cores want multiples of 8.
CHANNEL_MULTIPLE = 8


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
            random calibration inputs (speed does not depend on the weights or the scales).
        input_shape: ``[channels, height, width]`` of one image.
        runtime: ``onnxruntime`` (float32 ONNX in ONNX Runtime's CPU provider), ``onnxruntime-int8``
            (the same model quantized, :mod:`distill.quantize`), ``torch-cpu`` (eager float32) or
            ``torch-cuda`` (eager float32 on the GPU, synchronised).
        batch_size: images per forward.
        threads: CPU threads (default: ``torch.get_num_threads()``). ONNX Runtime's sessions keep their
            default settings (threads spin while waiting for work: 1.6x faster at batch 64 on a 2-core
            CPU than without); a 20 ms untimed pause before each model's calls lets the previous calls'
            threads go idle, so that a model timed alone is timed as it is beside others.
        warmup: untimed calls of each model first (ONNX Runtime's first runs, cuDNN's autotuning).
        rounds: interleaved rounds.
        repeats: calls per model and round.
    """
    check_runtime(runtime, batch_size)
    if warmup < 0 or rounds < 1 or repeats < 1 or (threads is not None and threads < 1):
        raise ValueError(
            f"need rounds, repeats (and threads, if given) >= 1 and warmup >= 0; got {rounds}, {repeats}, {threads}, "
            f"{warmup}"
        )
    threads = threads or torch.get_num_threads()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        calls = {name: stack.enter_context(_runner(m, runtime, x, threads)) for name, m in models.items()}
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, previous)
        sync = torch.cuda.synchronize if runtime == "torch-cuda" else (lambda: None)
        for call in calls.values():
            for _ in range(warmup):
                call()
        for _ in range(rounds):
            for name, call in calls.items():
                sync()
                time.sleep(0.02)  # the previous calls' threads go idle: one model or many, timed alike
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                sync()
                times[name].append(1000 * (time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


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
    rounds: int = 15  # ratios of StudentNets held within about 4% at 15 rounds, against 20% at 5 (RESULTS.md)
    repeats: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        check_runtime(self.runtime, self.batch_size)

    def __call__(self, models: Mapping[str, nn.Module | str | Path]) -> dict[str, float]:
        """Median milliseconds per batch of each model, measured side by side."""
        return compare_latency(models, self.input_shape, self.runtime, self.batch_size, self.threads, self.warmup,
                               self.rounds, self.repeats)  # fmt: skip

    def describe(self) -> str:
        """E.g. ``onnxruntime, batch 64, 2 threads``."""
        return f"{self.runtime}, batch {self.batch_size}, {self.threads or torch.get_num_threads()} threads"


def _export_for_timing(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Write ``model`` as ONNX to be timed: TorchScript-based export (0.05 s for a StudentNet, against 1.6 s
    for ``torch.export``; the pruning search times dozens of candidates). Both graphs ran alike in ONNX
    Runtime (RESULTS.md, issue 15); where the older exporter is gone or fails, the shipping export is used."""
    model = copy.deepcopy(model).cpu()  # the caller's module stays where it is
    try:
        with warnings.catch_warnings(), eval_mode(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"],
                              dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    except Exception:  # noqa: BLE001  (any failure of the fast path: take the shipping one)
        export_onnx(model, x, path)


@contextmanager
def _runner(
    model: nn.Module | str | Path, runtime: str, x: torch.Tensor, threads: int
) -> Iterator[Callable[[], object]]:
    """A zero-argument callable that runs one forward of ``model`` on ``x`` on ``runtime``."""
    if runtime.startswith("torch"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"runtime {runtime!r} measures a PyTorch module, got the file {model}")
        device = "cuda" if runtime == "torch-cuda" else "cpu"
        moved = copy.deepcopy(model).to(device).eval()  # the caller's module stays where it is
        xd = x.to(device)
        with torch.inference_mode():
            yield lambda: moved(xd)
        return
    ort = require_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model) if not isinstance(model, nn.Module) else Path(tmp) / "model.onnx"
        if isinstance(model, nn.Module):
            _export_for_timing(model, x[:1], path)
            if runtime == "onnxruntime-int8":
                calibration = [
                    torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(4)
                ]
                path = quantize_onnx(path, Path(tmp) / "model.int8.onnx", calibration)
        session = ort.InferenceSession(str(path), _timing_options(ort, threads), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        yield lambda: session.run(None, feed)


#: Threads of ONNX Runtime's process-wide pool, set by the first ORT timing of the process (``-1``: not ours).
_POOL_THREADS: int | None = None


def _timing_options(ort: Any, threads: int) -> Any:
    """Session options under which ORT sessions timed side by side do not slow each other down.

    Each session has its own threads by default, and they spin for a while after each run: on a 2-core CPU a
    StudentNet ran 1.5x slower beside another session than alone (2.3 against 1.5 ms at batch 64), a 20 ms pause
    between models did not help, 200 ms did (RESULTS.md, issue 15). So the sessions share one process-wide pool
    of ``threads`` threads, as spinning as ORT's default. The pool is created once per process; when another
    thread count is asked for later (or the pool was made elsewhere), each session gets its own threads with
    spinning off: slower, but again the same alone or beside others.
    """
    global _POOL_THREADS
    from onnxruntime.capi import _pybind_state

    if _POOL_THREADS is None:
        try:
            _pybind_state.set_global_thread_pool_sizes(threads, 1)
            _POOL_THREADS = threads
        except Exception:  # noqa: BLE001  (created before, with sizes we do not know)
            _POOL_THREADS = -1
    options = ort.SessionOptions()
    if threads == _POOL_THREADS:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
