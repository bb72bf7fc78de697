"""Which channel multiples the runtime runs fast: the evidence for ``distill.pruning.CHANNEL_MULTIPLE`` (issue 15).

    python benchmarks/channel_multiple.py                       # ONNX Runtime, batch 64, about a minute
    python benchmarks/channel_multiple.py --runtime torch-cpu

StudentNet (1x28x28, 10 classes, ``num_pools=3``) with layers 3..6 all ``c`` channels wide, for every ``c``
from ``--low`` to ``--high``, all timed side by side (:class:`distill.latency.LatencyMeter`). The table gives
each width's milliseconds and its time over the next wider multiple of 16 (a ratio above 1: a narrower
student that runs slower).
"""

from __future__ import annotations

import argparse

from distill.latency import LatencyMeter
from distill.report import markdown_table
from students import StudentNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--low", type=int, default=112)
    parser.add_argument("--high", type=int, default=144)
    args = parser.parse_args()
    widths = list(range(args.low, args.high + 1))
    meter = LatencyMeter((1, 28, 28), args.runtime, args.batch_size)

    def net(c: int) -> StudentNet:
        return StudentNet(num_classes=10, in_chans=1, num_pools=3, channels=[16, 32, 64, c, c, c, c, 256])

    ms = meter({str(c): net(c) for c in widths})
    lines = []
    for c in widths:
        up = -(-c // 16) * 16
        ratio = ms[str(c)] / ms[str(up)] if str(up) in ms else float("nan")
        kinds = [m for m in (16, 8, 4) if c % m == 0]
        lines.append([c, f"multiple of {kinds[0]}" if kinds else "odd" if c % 2 else "even", f"{ms[str(c)]:.3f}",
                      f"{ratio:.2f}"])  # fmt: skip
    header = ["channels of layers 3..6", "kind", f"ms ({meter.describe()})", "/ next multiple of 16"]
    print(markdown_table(header, "rlrr", lines))


if __name__ == "__main__":
    main()
