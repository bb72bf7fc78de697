"""The cost of one EMA update of a student: distill.EMA against Lightning's EMAWeightAveraging (issue 17).

    python benchmarks/ema_update.py                      # StudentNet and a ResNet-18, on the GPU if there is one
    python benchmarks/ema_update.py --device cpu --updates 200

Lightning's ``EMAWeightAveraging`` updates with torch's ``AveragedModel``: an average and a copy per tensor,
and two reads of its update count from the device (``bool(n_averaged == 0)``, ``n_averaged > 0``), each of which
makes the CPU wait for the GPU. ``distill.EMA`` updates with one ``torch._foreach_lerp_`` and counts on the host.
Per update of the student's parameters and buffers: the aten ops dispatched (kernels launched, roughly), the
device reads, and the wall time (median of ``--rounds`` interleaved rounds of ``--updates`` updates, synchronised).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from distill.ema import _LerpAverage
from students import create_student


class Ops(TorchDispatchMode):
    """Counts the aten ops dispatched, and the reads of a value (``_local_scalar_dense``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def averages(model: torch.nn.Module, decay: float) -> dict[str, AveragedModel]:
    """The average each callback builds (both average the buffers, Lightning's default)."""
    return {
        "Lightning EMAWeightAveraging": AveragedModel(model, use_buffers=True, avg_fn=get_ema_avg_fn(decay)),
        "distill.EMA": _LerpAverage(model, None, use_buffers=True, decay=decay),
    }


def _kwargs(student: str) -> dict:
    return {"small_input": True} if student.startswith("timm/") else {"num_pools": 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--students", nargs="+", default=["studentnet", "timm/resnet18"], help="registry names")
    parser.add_argument("--updates", type=int, default=500, help="updates per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per implementation, interleaved")
    args = parser.parse_args()
    if args.updates < 1 or args.rounds < 1:
        parser.error(f"--updates and --rounds must be at least 1, got {args.updates} and {args.rounds}")
    torch.manual_seed(0)
    try:  # every student and the device, before anything is timed
        device = torch.device(args.device)
        models = {s: create_student(s, num_classes=10, in_chans=1, **_kwargs(s)).to(device) for s in args.students}
    except (ValueError, RuntimeError) as err:
        parser.error(str(err).splitlines()[0])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, median of {args.rounds} rounds "
          f"of {args.updates} updates\n")  # fmt: skip
    print("| student | tensors | implementation | aten ops per update | device reads per update | us per update |")
    print("|---|---:|---|---:|---:|---:|")
    for student, model in models.items():
        tensors = len([*model.parameters(), *model.buffers()])
        impls = averages(model, decay=0.999)
        counts = {}
        for impl, average in impls.items():
            average.update_parameters(model)  # the first update copies; the next ones average
            with Ops() as ops:
                average.update_parameters(model)
            counts[impl] = ops
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl, average in impls.items():
                sync()
                start = time.perf_counter()
                for _ in range(args.updates):
                    average.update_parameters(model)
                sync()
                times[impl].append((time.perf_counter() - start) / args.updates * 1e6)
        for impl in impls:
            print(f"| {student} | {tensors} | {impl} | {counts[impl].ops} | {counts[impl].reads} | "
                  f"{statistics.median(times[impl]):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
