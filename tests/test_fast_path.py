"""The fast path: batches built on the device, channels-last, torch.compile, per-device defaults.

CI has no GPU: the device path runs here with CPU tensors (``on_device=True``), which is the same
code as on a GPU, and must give the DataLoader path's batches exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fmnist, tiny_trainer

from distill import DistillModule, KDLoss
from distill.data import Batch, DeviceBatches
from distill.lightning_cli import DistillCLI, default_precision
from distill.pruning import ChannelPruning
from students import create_student
from teachers import load_teacher

ROOT = Path(__file__).parents[1]


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("test_studentnet", num_classes=10, in_chans=1, num_pools=3)


@pytest.mark.parametrize("train", [True, False])
def test_device_batches_are_the_dataloader_batches(train: bool):
    dm = fmnist(augment=False)
    dm.setup("fit")
    dataset = dm.train_set if train else dm.val_set
    torch.manual_seed(0)
    expected = list(dm.train_dataloader() if train else dm.val_dataloader())
    state = torch.get_rng_state()
    torch.manual_seed(0)
    got = list(DeviceBatches(dataset, dm.batch_size, shuffle=train))
    assert len(got) == len(expected) == len(DeviceBatches(dataset, dm.batch_size, shuffle=train))
    for batch, (ex, ey, no_logits) in zip(got, expected, strict=True):
        assert isinstance(batch, Batch) and batch.teacher_logits is None and no_logits is None
        assert torch.equal(batch.x, ex) and torch.equal(batch.y, ey)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator moved on exactly as much


def test_device_batches_shard_the_epoch_across_processes():
    dm = fmnist(augment=False, val_size=0.5)
    dm.setup("fit")
    seen = []
    for rank in range(3):
        torch.manual_seed(0)
        batches = list(DeviceBatches(dm.train_set, 64, shuffle=True, rank=rank, world_size=3))
        seen.append(torch.cat([batch.y for batch in batches]))
    assert len({len(s) for s in seen}) == 1  # equal shares, so DDP ranks step together
    assert sum(len(s) for s in seen) - len(dm.train_set) < 3  # padded by at most world_size - 1


@pytest.mark.parametrize("augment", [False, True])
def test_on_device_path_trains_exactly_like_the_dataloader_path(tmp_path: Path, teacher_checkpoint: Path, augment):
    weights = {}
    for on_device in (False, True):
        model = DistillModule(student(), load_teacher(checkpoint=teacher_checkpoint), loss=KDLoss(4.0, 0.9), lr=0.01)
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path / str(on_device), max_epochs=2)
        datamodule = fmnist(augment=augment, on_device=on_device)
        trainer.fit(model, datamodule=datamodule)
        assert isinstance(trainer.train_dataloader, DeviceBatches) == on_device
        weights[on_device] = model.student.state_dict()
    # On the CPU even the augmentation draws come from the same generator in the same order.
    for key, value in weights[False].items():
        assert torch.equal(value, weights[True][key]), key


def test_channels_last_holds_through_pruning(tmp_path: Path, teacher_checkpoint: Path):
    losses = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        pupil = create_student("timm/test_resnet", num_classes=10, in_chans=1, small_input=True)
        teacher = load_teacher(checkpoint=teacher_checkpoint)
        model = DistillModule(pupil, teacher, lr=0.01, channels_last=channels_last)
        pruning = ChannelPruning("l1", schedule=lambda epoch: 0.25 if epoch == 0 else 0.0)
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path / str(channels_last), max_epochs=2, callbacks=[pruning])
        trainer.fit(model, datamodule=fmnist())
        losses[channels_last] = float(trainer.callback_metrics["train/loss"])
        assert len(pruning.reports) == 1 and pruning.reports[0].params_after < pruning.reports[0].params_before
        # 3x3 convs with several input channels, where the two layouts differ (the pruned ones included)
        convs = [
            m.weight
            for m in (*model.student.modules(), *teacher.modules())
            if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
        ]
        layout = {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs}
        assert layout == {channels_last}
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)  # the same training, another memory layout


@pytest.mark.slow
def test_compiled_student_and_teacher_train_like_eager(tmp_path: Path, teacher_checkpoint: Path):
    results = {}
    for compile in (False, True):
        model = DistillModule(student(), load_teacher(checkpoint=teacher_checkpoint), lr=0.01, compile=compile)
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path / str(compile), limit_train_batches=2, limit_val_batches=1)
        trainer.fit(model, datamodule=fmnist())
        assert (model.student._compiled_call_impl is not None) == compile
        results[compile] = (model.student.state_dict(), float(trainer.callback_metrics["train/loss"]))
    assert results[True][0].keys() == results[False][0].keys()  # compiled in place: checkpoint keys unchanged
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-3)


def test_precision_defaults_to_the_device():
    assert default_precision() == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    cli = DistillCLI(args=["--config", str(ROOT / "configs" / "debug.yaml")], run=False)
    assert cli.trainer.precision == default_precision()
    cli = DistillCLI(
        args=["--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.precision", "bf16-mixed"], run=False
    )
    assert cli.trainer.precision == "bf16-mixed"


def _run(script: str, *args: str) -> str:
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_throughput_benchmark_prints_its_table():
    out = _run("throughput.py", "--device", "cpu", "--batch-size", "32", "--limit-batches", "2", "--repeats", "1",
               "--teacher", "studentnet", "--teacher-kwargs", '{"base": 2}')  # fmt: skip
    rows = [
        line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| project") or "| plain" in line
    ]
    assert rows == ["plain", "project", "project-noaug", "project-cache"]
    assert "cache / live teacher" in out and "cache: filled" in out


def test_latency_benchmark_prints_its_table():
    out = _run("latency.py", "--backends", "torch-cpu", "ort-cpu", "--batches", "1", "--rounds", "1", "--repeats", "2",
               "--targets", "100000")  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| width") or line.startswith("| pruned")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "width 1.0", "width 0.75", "width 0.5", "width 0.25", "pruned to 100k"
    ]  # fmt: skip
    cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
    params, macs = ([int(c[i].replace(",", "")) for c in cells] for i in (1, 2))
    for c, count in zip(cells[:4], params, strict=False):  # each width's parameters are its StudentNet's
        kwargs = {"width_mult": float(c[0].split()[1]), "num_classes": 10, "in_chans": 1, "num_pools": 3}
        assert count == sum(p.numel() for p in create_student("studentnet", **kwargs).parameters())
    assert params[:4] == sorted(params[:4], reverse=True) and macs[:4] == sorted(macs[:4], reverse=True)
    assert params[-1] <= 100_000 < params[0] and macs[-1] < macs[0]  # width 1.0, pruned to the target
    assert all(float(ms) > 0 for c in cells for ms in c[3:])  # a latency for each backend
