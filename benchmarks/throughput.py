"""KD training throughput: this project's Lightning path against a plain PyTorch loop (issue 6).

    python benchmarks/throughput.py                                   # GPU: batch 512, bf16-mixed
    python benchmarks/throughput.py --device cpu --batch-size 128 --limit-batches 10   # 2-core CPU

One KD epoch over the Fashion-MNIST training split (55,000 images; 5,000 are held out for
validation), StudentNet (width 1.0, ``num_pools=3``) from a ResNet-18 teacher with the small-image
stem, at one batch size, precision and device. The teacher's weights are random unless
``--teacher-checkpoint`` is given: speed does not depend on them. Settings:

- ``plain``: a loop written here with no framework: the split on the device as uint8, per-batch
  crop/flip/normalise, teacher forward, KD loss, backward, fused AdamW, per-step LR schedule.
- ``project``: ``distill``'s path: ``Trainer.fit`` of ``DistillModule`` on ``FashionMNISTDataModule``
  (data on the device when it is a GPU), with the precision and layout defaults of the device.
- ``project-noaug`` and ``project-cache``: the same without augmentation, with the live teacher and
  with ``TeacherLogitCache`` (one cache file for all repeats: the first run fills it before its
  first epoch, the others load it; the fill time is printed apart).
- ``project-ema`` and ``project-ema-lightning``: ``project`` with an EMA of the student (decay 0.999),
  ``distill.EMA`` (one foreach update, no device reads) and Lightning's ``EMAWeightAveraging`` (torch's
  ``AveragedModel``: tensor by tensor, two device reads per step).

Each run trains two epochs and times the second (the first warms up cuDNN and the allocator). The
settings run ``--repeats`` times, interleaved, and the median is reported, with the ratios
project/plain and cache/live.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
import warnings
from typing import get_args

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EMAWeightAveraging

from distill import EMA, DistillModule, KDLoss
from distill.cache import TeacherLogitCache
from distill.data import FashionMNISTDataModule, random_crop, random_hflip
from distill.lightning_cli import default_precision
from distill.module import CompileMode
from distill.optim import lr_factor
from students import StudentNet, create_student
from teachers import FrozenTeacher, load_teacher

SETTINGS = ("plain", "project", "project-noaug", "project-cache", "project-ema", "project-ema-lightning")
LR, WEIGHT_DECAY, TEMPERATURE, ALPHA = 3e-3, 0.05, 4.0, 0.9


def build_teacher(args: argparse.Namespace) -> FrozenTeacher:
    if args.teacher_checkpoint:
        return load_teacher(checkpoint=args.teacher_checkpoint)
    kwargs = {"small_input": True} if args.teacher.startswith("timm/") else {"num_pools": 3}
    return FrozenTeacher(create_student(args.teacher, num_classes=10, in_chans=1, **kwargs | args.teacher_kwargs))


def datamodule(args: argparse.Namespace, augment: bool) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=args.data_root, batch_size=args.batch_size, augment=augment)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch_time(
    args: argparse.Namespace, device: torch.device, teacher: torch.nn.Module
) -> tuple[float, int, float]:
    """Two epochs of a hand-written KD loop; the wall time of the second, its image count, 0 set-up time."""
    dm = datamodule(args, augment=True)
    dm.setup("fit")
    images, labels = dm.train_set.images.to(device), dm.train_set.labels.to(device)
    mean, std = torch.tensor(dm.mean, device=device), torch.tensor(dm.std, device=device)
    bf16 = args.precision.startswith("bf16")
    channels_last = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = StudentNet(num_classes=10, in_chans=1, num_pools=3).to(device, memory_format=fmt)
    teacher = teacher.to(device, memory_format=fmt).eval()
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, fused=device.type == "cuda" or None)
    batches = math.ceil(len(labels) / args.batch_size)
    if args.limit_batches:
        batches = min(batches, args.limit_batches)
    total = 2 * batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, batches))
    t = TEMPERATURE
    elapsed, seen = 0.0, 0
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(labels), device=device)
        seen = 0
        for i in range(batches):
            index = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = random_hflip(random_crop(images[index], dm.crop_padding)).float().div_(255.0)
            x = ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous(memory_format=fmt)
            y = labels[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = student(x)
            logits, teacher_logits = logits.float(), teacher_logits.float()
            soft, soft_target = F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1)
            kd = F.kl_div(soft, soft_target, reduction="batchmean", log_target=True)
            loss = ALPHA * t * t * kd + (1 - ALPHA) * F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
        sync(device)
        elapsed = time.perf_counter() - start
    return elapsed, seen, 0.0


class EpochTimer(pl.Callback):
    """Wall time and image count of each training epoch, and the time from fit start to the first epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.images = 0
        self.setup_s = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()  # the callbacks after this one (the cache) fill in between

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.images = 0
        self._start = time.perf_counter()
        if trainer.current_epoch == 0:
            self.setup_s = self._start - self._fit_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def project_epoch_time(
    args: argparse.Namespace,
    device: torch.device,
    teacher: torch.nn.Module,
    augment: bool,
    cache: str | None,
    ema: type[EMAWeightAveraging] | None = None,
) -> tuple[float, int, float]:
    """Two epochs of ``Trainer.fit``; the wall time of the second, its image count, the time before the first."""
    timer = EpochTimer()
    callbacks = [timer] + ([TeacherLogitCache(cache)] if cache else []) + ([ema(decay=0.999)] if ema else [])
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_epochs=2,
        limit_train_batches=args.limit_batches or 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model = DistillModule(
        StudentNet(num_classes=10, in_chans=1, num_pools=3),
        teacher=copy.deepcopy(teacher) if args.compile else teacher,  # compiled in place: the plain loop stays eager
        loss=KDLoss(TEMPERATURE, ALPHA),
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_epochs=1,
        compile=args.compile,
    )
    trainer.fit(model, datamodule=datamodule(args, augment))
    return timer.times[-1], timer.images, timer.setup_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    parser.add_argument("--limit-batches", type=int, default=0, help="batches per epoch (0: the whole split)")
    parser.add_argument("--teacher", default="timm/resnet18", help="teacher model, random weights (timm: small stem)")
    parser.add_argument("--teacher-kwargs", type=json.loads, default={}, help='its arguments as JSON: {"base": 2}')
    parser.add_argument("--teacher-checkpoint", default=None, help="a trained teacher instead of --teacher")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        choices=[True, *get_args(CompileMode)],
        help="torch.compile student and teacher in the project runs; a mode may follow (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or (default_precision() if device.type == "cuda" else "32-true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    teacher = build_teacher(args)

    cache_dir = tempfile.TemporaryDirectory()
    runs = {
        "plain": lambda: plain_epoch_time(args, device, teacher),
        "project": lambda: project_epoch_time(args, device, teacher, augment=True, cache=None),
        "project-noaug": lambda: project_epoch_time(args, device, teacher, augment=False, cache=None),
        "project-cache": lambda: project_epoch_time(args, device, teacher, augment=False, cache=cache_dir.name),
        "project-ema": lambda: project_epoch_time(args, device, teacher, augment=True, cache=None, ema=EMA),
        "project-ema-lightning": lambda: project_epoch_time(
            args, device, teacher, augment=True, cache=None, ema=EMAWeightAveraging
        ),
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in args.settings}
    setup: dict[str, list[float]] = {name: [] for name in args.settings}
    for repeat in range(args.repeats):
        for name in args.settings:
            torch.manual_seed(repeat)
            seconds, images, setup_s = runs[name]()
            results[name].append((seconds, images))
            setup[name].append(setup_s)
            print(f"repeat {repeat} {name}: {images / seconds:,.0f} img/s ({seconds:.2f} s for {images} images)")
    cache_dir.cleanup()

    cpu = f"CPU ({torch.get_num_threads()} threads)"
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(
        f"\n{name_of}, {args.precision}, batch {args.batch_size}, teacher {args.teacher_checkpoint or args.teacher}"
        f"{args.teacher_kwargs or ''}, "
        f"torch {torch.__version__}, compile={args.compile}, {time.strftime('%Y-%m-%d')}, median of {args.repeats}\n"
    )
    print("| setting | augment | teacher | img/s | s per 60k images | vs plain | vs project |")
    print("|---|---|---|---:|---:|---:|---:|")
    speed = {n: statistics.median(images / seconds for seconds, images in r) for n, r in results.items()}
    for name in args.settings:
        aug = "no" if name in ("project-noaug", "project-cache") else "yes"
        source = "cached logits" if name == "project-cache" else "live"
        ratio = f"{speed[name] / speed['plain']:.3f}" if "plain" in speed else "-"
        project = f"{speed[name] / speed['project']:.3f}" if "project" in speed else "-"
        print(f"| {name} | {aug} | {source} | {speed[name]:,.0f} | {60000 / speed[name]:.2f} | {ratio} | {project} |")
    if "project-cache" in speed and "project-noaug" in speed:
        print(f"\ncache / live teacher (no augmentation): {speed['project-cache'] / speed['project-noaug']:.2f}x")
    if "project-cache" in setup:
        fill, load = setup["project-cache"][0], statistics.median(setup["project-cache"][1:] or [float("nan")])
        print(f"cache: filled before the first epoch in {fill:.2f} s (train and val splits), loaded in {load:.2f} s")


if __name__ == "__main__":
    main()
