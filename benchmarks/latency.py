"""Student latency on the runtimes it may ship on: the width family beside pruned students of the same sizes (issue 14).

    python benchmarks/latency.py                       # the tables in benchmarks/RESULTS.md (a few minutes, 2 cores)
    python benchmarks/latency.py --runtimes onnxruntime --batches 64 --rounds 2   # a quick look
    python benchmarks/latency.py --batches 256 --widths 0.75 --rankings global --round-to 1 \
        --profile "width 0.75" "global r1 to 0.75"   # where the time goes (ONNX Runtime's profiler, torch.profiler)

Students: StudentNet of the Fashion-MNIST recipes (10 classes, 1x28x28 images, ``num_pools=3``) at
``width_mult`` 1.0, 0.75, 0.5 and 0.25 (the width family), and the width-1.0 net pruned with
``prune_student(..., target_params=P)`` to each smaller width's parameter count P, with ``round_to``
1, 8 and 16, under two policies (``--rankings``):

- ``layer``: the shipped recipe's policy (``configs/fmnist/prune_distill.yaml`` and ``distill
  prune-distill``'s defaults): ``PruningPolicy("l1", global_ranking=False, min_fraction=0.1,
  round_to=R, ignored_layers=students.UNSCALED_LAYERS)``. Every pruned layer loses the same share,
  so the result has exactly the channels of the width member of the same size, whatever ``round_to``;
  such a student is listed but not timed again (its row says which width it equals).
- ``global``: the same with ``global_ranking=True`` (``distill prune-distill --global_ranking true``):
  channels are ranked across layers, which leaves odd channel counts unless ``round_to`` rounds them.

Pruning is one-shot here (prune-distill prunes in rounds and trains between them, so its channel counts
can differ from these by rounding). Weights are random: latency does not depend on them.

Latency is :func:`distill.latency.compare_latency`: all students interleaved in each round, so that
machine noise hits them alike, the median over ``--rounds`` rounds of ``--repeats`` calls, in
milliseconds per forward of a batch. Runtimes (``--runtimes``; default: all of them this machine has):

- ``torch-cpu``: eager PyTorch, float32;
- ``onnxruntime``: the ONNX export (``distill.export.export_onnx``, exported once per student) in ONNX
  Runtime's CPU provider, float32;
- ``onnxruntime-int8``: that file quantized once per student (``distill.quantize.quantize_onnx``: QDQ,
  per-channel, int8 activations and weights), calibrated on random images;
- ``torch-cuda``: eager PyTorch on the GPU, float32, when one is present.

Prints a table of the students (parameters, MACs per image, channels), one latency table per runtime
(with each pruned student's time over that of the width member of its size), and int8 ms / float32 ms
per student (above 1: int8 is slower). ``--profile`` adds, for the students named, where the time of a
forward at the last batch size goes: ONNX Runtime's profiler (time per op type, the slowest nodes, the
node types of the graph it optimised) and ``torch.profiler`` for ``torch-cpu``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill.export import export_onnx
from distill.latency import RUNTIMES, compare_latency
from distill.profile import count_macs, count_params
from distill.pruning import PruningPolicy, prune_student
from distill.quantize import quantize_onnx
from students import UNSCALED_LAYERS, StudentNet

SHAPE = (1, 28, 28)
WIDTHS = (1.0, 0.75, 0.5, 0.25)


def student(width: float = 1.0) -> StudentNet:
    torch.manual_seed(0)
    return StudentNet(num_classes=10, in_chans=1, width_mult=width, num_pools=3).eval()


def policy(ranking: str, round_to: int) -> PruningPolicy:
    """``configs/fmnist/prune_distill.yaml``'s policy (``layer``), or the same with global ranking."""
    return PruningPolicy(
        "l1", global_ranking=ranking == "global", min_fraction=0.1, round_to=round_to, ignored_layers=UNSCALED_LAYERS
    )


def build(widths: list[float], rankings: list[str], round_tos: list[int]) -> dict[str, dict]:
    """The students by label: ``model``, ``size_of`` (the width whose parameter count it was pruned to)."""
    models = {f"width {w}": {"model": student(w), "size_of": w} for w in sorted({1.0, *widths}, reverse=True)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pruning's many tiny forwards: a second thread only waits (10x slower on a busy CPU)
    try:
        for w in sorted(set(widths) - {1.0}, reverse=True):
            target = count_params(models[f"width {w}"]["model"])
            for ranking in rankings:
                for round_to in round_tos:
                    model = student(1.0)
                    prune_student(model, torch.zeros(1, *SHAPE), policy(ranking, round_to), target_params=target)
                    models[f"{ranking} r{round_to} to {w}"] = {"model": model.eval(), "size_of": w}
    finally:
        torch.set_num_threads(threads)
    first: dict[tuple[int, ...], str] = {}  # the first student with each channel list is timed; the others equal it
    for label, entry in models.items():
        entry["same_as"] = first.setdefault(tuple(entry["model"].channels), label)
    return models


def onnx_files(models: dict[str, torch.nn.Module], runtimes: list[str], workdir: Path) -> dict[str, dict[str, Path]]:
    """Each student exported once (and quantized once), as file paths by runtime and label."""
    files: dict[str, dict[str, Path]] = {r: {} for r in runtimes if r.startswith("onnxruntime")}
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, *SHAPE, generator=generator) for _ in range(4)]
    for i, (label, model) in enumerate(models.items()):
        fp32 = workdir / f"{i}.onnx"
        export_onnx(model, torch.zeros(1, *SHAPE), fp32)
        if "onnxruntime" in files:
            files["onnxruntime"][label] = fp32
        if "onnxruntime-int8" in files:
            files["onnxruntime-int8"][label] = quantize_onnx(fp32, workdir / f"{i}.int8.onnx", calibration)
    return files


def ort_profile(path: Path, batch: int, threads: int, workdir: Path, calls: int = 20) -> tuple[float, dict, dict, dict]:
    """ONNX Runtime's profiler on ``path``, set up as ``compare_latency`` sets it up.

    Returns ms per forward, {op type: (ms per forward, nodes)}, the node types of the graph ONNX Runtime
    optimised (``nchwc.Conv``: the blocked-layout kernels; a plain ``Conv`` fell out of them) and the
    three slowest (op type, weight shape, output shape) with their ms per forward (alike nodes summed).
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.enable_profiling, options.profile_file_prefix = True, str(workdir / "profile")
    options.optimized_model_filepath = str(workdir / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: torch.randn(batch, *SHAPE).numpy()}
    for _ in range(5 + calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-calls:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops: dict[str, list] = {}
    nodes: dict[str, float] = {}
    for e in kernels:
        if e["ts"] >= runs[0]["ts"]:
            op, out = e["args"]["op_name"], next(iter(e["args"]["output_type_shape"][0].values()))
            weights = [s for i in e["args"]["input_type_shape"][1:] for s in i.values() if len(s) == 4][:1]
            key = f"{op}{''.join(f' w{w}' for w in weights)} ->{out}".replace(", ", ",")
            nodes[key] = nodes.get(key, 0.0) + e["dur"] / calls / 1000
            ops.setdefault(op, [0.0, set()])
            ops[op][0] += e["dur"] / calls / 1000
            ops[op][1].add(e["name"])
    graph = onnx.load(options.optimized_model_filepath).graph
    types = collections.Counter(f"{n.domain.removeprefix('com.microsoft')}.{n.op_type}".lstrip(".") for n in graph.node)
    per_op = {op: (ms, len(names)) for op, (ms, names) in sorted(ops.items(), key=lambda kv: -kv[1][0])}
    slowest = dict(sorted(nodes.items(), key=lambda kv: -kv[1])[:3])
    return sum(e["dur"] for e in runs) / calls / 1000, per_op, dict(types), slowest


def torch_profile(model: torch.nn.Module, batch: int, threads: int, calls: int = 20) -> tuple[float, dict]:
    """``torch.profiler`` on eager CPU forwards: ms per forward and {op: (self ms per forward, calls per forward)}."""
    from torch.profiler import ProfilerActivity, profile

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(batch, *SHAPE)
    try:
        with torch.inference_mode():
            for _ in range(5):
                model(x)
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    model(x)
            total = (time.perf_counter() - start) / calls * 1000
    finally:
        torch.set_num_threads(previous)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return total, {e.key: (e.self_cpu_time_total / calls / 1000, e.count // calls) for e in ops if e.count >= calls}


def print_profiles(labels: list[str], students: dict, files: dict, args: argparse.Namespace, workdir: Path) -> None:
    """One line per student and runtime: where the time of a forward at the last batch size goes."""
    batch = args.batches[-1]
    if not labels:
        return
    print(f"\nProfiles at batch {batch}: ms per forward (profiled), then the op types by time: ms, nodes (or calls)\n")
    for label in labels:
        for runtime in args.runtimes:
            if runtime in files:
                total, ops, graph, slowest = ort_profile(files[runtime][label], batch, args.threads, workdir)
                graph_text = "; slowest " + ", ".join(f"{node} {ms:.2f}" for node, ms in slowest.items())
                graph_text += "; graph " + ", ".join(f"{op} {n}" for op, n in graph.items())
            elif runtime == "torch-cpu":
                (total, ops), graph_text = torch_profile(students[label]["model"], batch, args.threads), ""
            else:
                continue
            top = ", ".join(f"{op} {ms:.2f} ({n})" for op, (ms, n) in list(ops.items())[:8])
            print(f"- {runtime} {label}: {total:.2f} ms; {top}{graph_text}")


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown table; ``align`` has an ``l`` or ``r`` per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = ["torch-cpu"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        available += ["onnxruntime", "onnxruntime-int8"]
    except ImportError:
        pass
    if torch.cuda.is_available():
        available.append("torch-cuda")
    parser.add_argument("--runtimes", nargs="+", default=available, choices=RUNTIMES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--widths", nargs="+", type=float, default=list(WIDTHS), help="width family (1.0 is added)")
    parser.add_argument("--rankings", nargs="*", default=["layer", "global"], choices=("layer", "global"))
    parser.add_argument("--round-to", nargs="*", type=int, default=[1, 8, 16], help="round_to of the pruned students")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    parser.add_argument("--repeats", type=int, default=10, help="calls per student and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per student first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of every runtime")
    parser.add_argument(
        "--profile", nargs="*", default=[], metavar="STUDENT", help="students (labels) to profile after the tables"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    students = build(args.widths, args.rankings, args.round_to)
    timed = {label: s["model"] for label, s in students.items() if s["same_as"] == label}
    unknown = [label for label in args.profile if label not in timed]
    if unknown:
        parser.error(f"--profile: no timed student {unknown}; choose from {list(timed)}")
    with tempfile.TemporaryDirectory() as tmp:
        report(args, students, timed, Path(tmp), start)


def report(args: argparse.Namespace, students: dict, timed: dict, workdir: Path, start: float) -> None:
    """Export, measure and print the tables (and the profiles)."""
    x1 = torch.zeros(1, *SHAPE)
    ms: dict[str, dict[int, dict[str, float]]] = {}
    files = onnx_files(timed, args.runtimes, workdir)
    for runtime in args.runtimes:
        models = files.get(runtime, timed)
        ms[runtime] = {
            b: compare_latency(models, SHAPE, runtime, b, args.threads, args.warmup, args.rounds, args.repeats)
            for b in args.batches
        }

    gpu = f", GPU {torch.cuda.get_device_name()}" if "torch-cuda" in args.runtimes else ""
    ort = f", onnxruntime {__import__('onnxruntime').__version__}" if files else ""
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {args.threads} CPU threads{gpu}, torch {torch.__version__}{ort}; median of "
        f"{args.rounds} interleaved rounds of {args.repeats} calls; {time.perf_counter() - start:.0f} s in all\n"
    )
    print("Students (`layer`: the shipped prune-distill policy; `global`: global ranking; rR: round_to R):\n")
    rows = []
    for label, s in students.items():
        model = s["model"]
        same = "" if s["same_as"] == label else s["same_as"]
        channels = "[" + ",".join(map(str, model.channels)) + "]"
        rows.append([label, f"{count_params(model):,}", f"{count_macs(model, x1):,}", channels, same])
    print(table(["student", "params", "MACs", "channels", "same channels as"], rows, "lrrll"))

    last = args.batches[-1]
    for runtime in args.runtimes:
        print(f"\n{runtime}: ms per forward; last column: over the width member of the same size at batch {last}\n")
        rows = []
        for label in timed:
            size_of = f"width {students[label]['size_of']}"
            times = [f"{ms[runtime][b][label]:.3f}" for b in args.batches]
            rows.append([label, *times, f"{ms[runtime][last][label] / ms[runtime][last][size_of]:.2f}"])
        print(
            table(
                ["student", *(f"b{b} ms" for b in args.batches), f"/ width b{last}"],
                rows,
                "l" + "r" * (len(args.batches) + 1),
            )
        )

    if {"onnxruntime", "onnxruntime-int8"} <= set(args.runtimes):
        print("\nonnxruntime-int8 ms / onnxruntime ms (above 1: int8 is slower)\n")
        rows = []
        for label in timed:
            ratios = [ms["onnxruntime-int8"][b][label] / ms["onnxruntime"][b][label] for b in args.batches]
            rows.append([label, *(f"{r:.2f}" for r in ratios), f"{statistics.median(ratios):.2f}"])
        print(table(["student", *(f"b{b}" for b in args.batches), "median"], rows, "l" + "r" * (len(args.batches) + 1)))
    print_profiles(args.profile, students, files, args, workdir)


if __name__ == "__main__":
    main()
