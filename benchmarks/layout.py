"""Training step time with contiguous (NCHW) against channels-last (NHWC) weights and inputs (``channels_last``).

    python benchmarks/layout.py --device cpu                 # the quickstart's models and batch on this CPU
    python benchmarks/layout.py --device cpu --small-input   # the teacher of configs/fmnist/teacher.yaml
    python benchmarks/layout.py --device cpu --batches 2 --repeats 1 --teacher test_resnet --batch-size 16

Three steps through ``Trainer.fit`` of ``DistillModule``, as the recipes run them: the teacher trained on labels
(a timm model: the quickstart's ResNet-18 with the standard stem by default, or with ``--small-input`` the
small-image stem of ``configs/fmnist/teacher.yaml``), StudentNet 1.0 (``num_pools=3``)
trained on labels alone, and a KD step (StudentNet from that teacher, live, random weights: speed does not depend
on them). Each step times ``--batches`` batches of Fashion-MNIST (without augmentation) after one untimed batch,
in both layouts, interleaved ``--repeats`` times; the table gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from distill import DistillModule, KDLoss
from distill.data import FashionMNISTDataModule
from students import StudentNet, create_student
from teachers import FrozenTeacher


class _StepTimer(pl.Callback):
    """Milliseconds per training batch after the first (which warms up the kernels and the allocator)."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == 1:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, *args) -> None:
        self.ms = (time.perf_counter() - self.start) / (trainer.global_step - 1) * 1000


def step_ms(module: DistillModule, args: argparse.Namespace) -> float:
    timer = _StepTimer()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=args.batches + 1, limit_val_batches=0, logger=False,
                         accelerator=args.device, devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[timer])  # fmt: skip
    trainer.fit(module, datamodule=FashionMNISTDataModule(batch_size=args.batch_size))
    return timer.ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--teacher", default="resnet18", help="timm name of the teacher")
    parser.add_argument("--small-input", action="store_true", help="the teacher's small-image stem (teacher.yaml's)")
    parser.add_argument("--batch-size", type=int, default=256, help="the quickstart's")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each layout")
    args = parser.parse_args()
    if min(args.batch_size, args.batches, args.repeats) < 1:
        parser.error("--batch-size, --batches and --repeats must be >= 1")
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu needs a CUDA GPU; this machine has none (use --device cpu)")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    torch.manual_seed(0)
    stem = {"small_input": True} if args.small_input else {}
    try:  # before anything is timed
        teacher = create_student(f"timm/{args.teacher}", num_classes=10, in_chans=1, **stem).eval()
    except ValueError as err:
        parser.error(str(err).splitlines()[0])
    student = StudentNet(num_classes=10, in_chans=1, num_pools=3)

    def steps(channels_last: bool) -> dict[str, nn.Module]:
        kd = DistillModule(copy.deepcopy(student), teacher=FrozenTeacher(copy.deepcopy(teacher)), loss=KDLoss(4.0, 0.9),
                           channels_last=channels_last)  # fmt: skip
        return {
            f"teacher ({args.teacher}), labels": DistillModule(copy.deepcopy(teacher), channels_last=channels_last),
            "StudentNet 1.0, labels": DistillModule(copy.deepcopy(student), channels_last=channels_last),
            f"KD: StudentNet 1.0 from {args.teacher}": kd,
        }

    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for channels_last in (False, True):
            for name, module in steps(channels_last).items():
                times.setdefault((name, channels_last), []).append(step_ms(module, args))
    print(f"\n{args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, float32, teacher "
          f"{args.teacher} ({'small-image' if args.small_input else 'standard'} stem), median of "
          f"{args.repeats} interleaved runs of {args.batches} batches\n")  # fmt: skip
    print("| step | contiguous ms | channels-last ms | contiguous / channels-last |\n|---|---:|---:|---:|")
    for name in dict.fromkeys(name for name, _ in times):
        nchw, nhwc = (statistics.median(times[name, cl]) for cl in (False, True))
        print(f"| {name} | {nchw:.1f} | {nhwc:.1f} | {nchw / nhwc:.2f} |")


if __name__ == "__main__":
    main()
