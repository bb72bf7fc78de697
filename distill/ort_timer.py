"""Interleaved timing, and ONNX Runtime files timed in a process of their own with one shared thread pool.

ONNX Runtime sessions each own their threads by default, and those threads spin for a while after every
run: on a 2-core CPU a StudentNet timed 1.5x slower beside another session than alone (RESULTS.md, issue
15). Sessions that share one process-wide pool (``set_global_thread_pool_sizes``) time the same alone or
side by side, with ORT's default spinning. But once that pool exists, ONNX Runtime refuses every session
of the process that asks for threads of its own (the default, also inside ``onnxruntime.quantization``),
so the timing runs in a child process that only times: ``python ort_timer.py`` reads a JSON request on
stdin and prints the medians. This file imports nothing of the project (the child starts in 0.3 s).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping

__all__ = ["interleaved"]


def interleaved(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    rounds: int,
    repeats: int,
    sync: Callable[[], object] = lambda: None,
    pause: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per call of each callable: ``warmup`` untimed calls each, then ``rounds`` rounds
    that time ``repeats`` back-to-back calls of every callable in turn.

    ``pause``: untimed seconds before each callable's calls. None is needed with ONNX Runtime's one shared
    pool: a model times the same alone or beside others without it, and a 20 ms pause doubled the time of a
    timing for the same spread (RESULTS.md, "The timer's pause"). Eager PyTorch in the calling process keeps
    a 20 ms pause: without it StudentNet read 1.15x faster alone than beside others.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            sync()
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            sync()
            times[name].append(1000 * (time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def _time_files(request: dict) -> dict[str, float]:
    """The child's work: the request's ONNX files, in sessions that share one pool of ``threads`` threads."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(request["threads"], 1)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    x = np.random.default_rng(0).standard_normal((request["batch_size"], *request["input_shape"]), dtype=np.float32)
    calls = {}
    for name, path in request["files"].items():
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        calls[name] = lambda session=session, feed=feed: session.run(None, feed)
    return interleaved(calls, request["warmup"], request["rounds"], request["repeats"], pause=request.get("pause", 0.0))


if __name__ == "__main__":
    json.dump(_time_files(json.load(sys.stdin)), sys.stdout)
