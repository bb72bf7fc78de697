"""The fast path: batches built on the device, channels-last, torch.compile, per-device defaults.

CI has no GPU: the device path runs here with CPU tensors (``on_device=True``), which is the same
code as on a GPU, and must give the DataLoader path's batches exactly.
"""

from __future__ import annotations

import ast
import linecache
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import fmnist, run_script, tiny_trainer
from pytorch_lightning import Callback, seed_everything
from pytorch_lightning.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from distill import EMA, DistillModule, DISTLoss, DKDLoss, KDLoss, LogitStandardKDLoss
from distill.cache import TeacherLogitCache
from distill.data import Batch, DeviceBatches
from distill.lightning_cli import DistillCLI, default_precision
from distill.profile import count_macs, count_params
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


class DeviceReads(TorchDispatchMode):
    """The ops of a step that would make the CPU wait for a GPU, run here on the CPU.

    Reading a value (``.item()``, ``bool()``, ``float()``: ``_local_scalar_dense``) and every op whose output size
    depends on the data (``nonzero``, boolean masks as indices, ``unique``, ``masked_select``). Two reads happen on
    the CPU only and are left out: ``one_hot``'s range checks when it is given the class count (skipped for CUDA
    tensors) and the reads of the optimizer's step counts (host tensors on a GPU too; fused optimizers read
    none). Blind to copies between devices (``.cpu()``, ``.tolist()``, ``torch.tensor(x, device=...)``), which
    the CPU cannot tell from no-ops.
    """

    DATA_SIZED = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.counting: str | None = None  # what runs: "training" or "validation" (None: not counted)
        self.host_tensors: set[int] = set()  # ids of the optimizer's step counts
        self.reads: list[str] = []

    def __enter__(self):
        one_hot = F.one_hot

        def checked_on_the_host(tensor: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
            counting, self.counting = self.counting, self.counting if num_classes < 1 else None
            try:
                return one_hot(tensor, num_classes)
            finally:
                self.counting = counting

        self.restore = lambda: setattr(F, "one_hot", one_hot)
        F.one_hot = checked_on_the_host
        return super().__enter__()

    def __exit__(self, *exc):
        self.restore()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name in self.INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        read = name == "_local_scalar_dense" and id(args[0]) not in self.host_tensors
        if self.counting and (read or name in self.DATA_SIZED or masked):
            wrappers = ("torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile.py", "test_fast_path.py")
            caller = next(f for f in reversed(traceback.extract_stack()) if not any(w in f.filename for w in wrappers))
            where = f"{Path(caller.filename).name}:{caller.lineno} {linecache.getline(caller.filename, caller.lineno)}"
            self.reads.append(f"{self.counting}: {name} at {where.strip()}")
        return func(*args, **(kwargs or {}))


class BatchesAfterTheFirst(Callback):
    """Counts from the second batch of training, and of validation, to the end of each one's last batch."""

    def __init__(self, mode: DeviceReads) -> None:
        self.mode = mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode.counting = "training" if batch_idx >= 1 else None
        states = [state for optimizer in trainer.optimizers for state in optimizer.state.values()]
        self.mode.host_tensors = {id(state["step"]) for state in states if "step" in state}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.mode.counting = "validation" if batch_idx >= 1 else None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mode.counting = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # before the module logs the epoch's metrics
        self.mode.counting = None


@pytest.mark.parametrize(
    ("loss", "lever"),
    [
        (KDLoss, "mixup"),
        (DKDLoss, "mixup"),
        (LogitStandardKDLoss, "mixup"),
        (DISTLoss, "mixup"),
        (KDLoss, "labels"),
        (DKDLoss, "labels"),
        (KDLoss, "cached logits"),
    ],
)
def test_a_step_never_makes_the_cpu_wait_for_the_gpu(
    tmp_path: Path, teacher_checkpoint: Path, small_teacher_checkpoint: Path, loss, lever: str
):
    """Training and validation steps, batches built on the device, with every lever: augmentation, random erasing,
    the EMA, and mixup, plain labels, or the teacher's cached logits (no augmentation: the sweeps' path); the
    progress bar and a logger on, as in a user's run."""
    seed_everything(0)  # numpy's generator too: timm's Mixup draws mixup or cutmix from it
    cached = lever == "cached logits"
    teacher = load_teacher(checkpoint=small_teacher_checkpoint if cached else teacher_checkpoint)
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0} if lever == "mixup" else None
    model = DistillModule(student(), teacher, loss=loss(), lr=0.01, mixup=mixup)
    mode = DeviceReads()
    callbacks = [EMA(decay=0.9), BatchesAfterTheFirst(mode)] + ([TeacherLogitCache(tmp_path)] if cached else [])
    logger = CSVLogger(tmp_path)  # with the progress bar: both read values only every log_every_n_steps (50)
    trainer = tiny_trainer(tmp_path, limit_train_batches=4, limit_val_batches=3, callbacks=callbacks, logger=logger,
                           enable_progress_bar=True)  # fmt: skip
    with mode:
        trainer.fit(model, datamodule=fmnist(augment=not cached, random_erasing=0.0 if cached else 0.5, on_device=True))
    assert trainer.global_step == 4 and mode.counting is None
    assert cached == any(tmp_path.glob("*.pt"))  # the cache was filled and read
    assert mode.reads == []


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
def test_compiled_student_and_teacher_train_like_eager(tmp_path: Path, small_teacher_checkpoint: Path):
    results = {}
    for compile in (False, "reduce-overhead"):  # a mode (CUDA graphs on a GPU, the default kernels on the CPU)
        model = DistillModule(student(), load_teacher(checkpoint=small_teacher_checkpoint), lr=0.01, compile=compile)
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path / str(compile), limit_train_batches=2, limit_val_batches=1)
        trainer.fit(model, datamodule=fmnist())
        assert (model.student._compiled_call_impl is not None) == bool(compile)
        results[compile] = (model.student.state_dict(), float(trainer.callback_metrics["train/loss"]))
    compiled, eager = results["reduce-overhead"], results[False]
    assert compiled[0].keys() == eager[0].keys()  # compiled in place: checkpoint keys unchanged
    assert compiled[1] == pytest.approx(eager[1], rel=1e-3)


def test_compile_takes_a_mode_and_refuses_an_unknown_one():
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "--model.compile", "reduce-overhead"]
    assert DistillCLI(args=args, run=False).model.hparams.compile == "reduce-overhead"
    args[-1] = "true"
    assert DistillCLI(args=args, run=False).model.hparams.compile is True
    with pytest.raises(ValueError, match=r"torch\.compile mode .*got 'fast'"):
        DistillModule(student(), compile="fast")


def test_precision_defaults_to_the_device():
    assert default_precision() == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    cli = DistillCLI(args=["--config", str(ROOT / "configs" / "debug.yaml")], run=False)
    assert cli.trainer.precision == default_precision()
    cli = DistillCLI(
        args=["--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.precision", "bf16-mixed"], run=False
    )
    assert cli.trainer.precision == "bf16-mixed"


def _run(script: str, *args: str) -> str:
    return run_script(f"benchmarks/{script}", *args).stdout


def test_throughput_benchmark_prints_its_table():
    out = _run("throughput.py", "--device", "cpu", "--batch-size", "32", "--limit-batches", "2", "--repeats", "1",
               "--teacher", "studentnet", "--teacher-kwargs", '{"base": 2}')  # fmt: skip
    rows = [
        line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| project") or "| plain" in line
    ]
    assert rows == ["plain", "project", "project-noaug", "project-cache", "project-ema", "project-ema-lightning"]
    assert "cache / live teacher" in out and "cache: filled" in out


def test_ema_benchmark_prints_its_table():
    out = _run("ema_update.py", "--device", "cpu", "--students", "studentnet", "--updates", "2", "--rounds", "1")
    rows = {r["implementation"]: r for _, table in _tables(out) for r in table}
    assert rows.keys() == {"Lightning EMAWeightAveraging", "distill.EMA"}
    assert rows["Lightning EMAWeightAveraging"]["device reads per update"] == "2"
    assert (
        rows["distill.EMA"]["device reads per update"] == "0" and int(rows["distill.EMA"]["aten ops per update"]) <= 3
    )


def _tables(out: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Each Markdown table of ``out``, as (the line above it, its rows as {header: cell})."""
    tables, title, rows = [], "", []
    for line in [*out.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if rows:
            header, _, *body = rows
            tables.append((title, [dict(zip(header, row, strict=True)) for row in body]))
        title, rows = (line if line.strip() else title), []
    return tables


def _ratio_ok(shown: str, a: str, b: str) -> bool:
    """``shown`` (2 decimals) is a / b for some a, b that round to the shown 3-decimal times."""
    lo, hi = (float(a) - 5e-4) / (float(b) + 5e-4), (float(a) + 5e-4) / max(float(b) - 5e-4, 1e-9)
    return lo - 5e-3 <= float(shown) <= hi + 5e-3


def test_latency_benchmark_prints_its_tables():
    runtimes = ["torch-cpu", "onnxruntime", "onnxruntime-int8"]
    out = _run("latency.py", "--runtimes", *runtimes, "--batches", "1", "3", "--widths", "0.5", "--round-to", "1", "16",
               "--rounds", "1", "--repeats", "1", "--warmup", "0", "--profile", "global r1 to 0.5")  # fmt: skip
    (students_title, students), *latency_tables, (ratio_title, ratios) = _tables(out)
    assert students_title.startswith("Students") and ratio_title.startswith("onnxruntime-int8 ms / onnxruntime ms")
    assert [title.split(":")[0] for title, _ in latency_tables] == runtimes
    students = {row["student"]: row for row in students}
    assert list(students) == [
        "width 1.0", "width 0.5", "layer r1 to 0.5", "layer r16 to 0.5", "global r1 to 0.5", "global r16 to 0.5"
    ]  # fmt: skip
    x, size = torch.zeros(1, 1, 28, 28), int(students["width 0.5"]["params"].replace(",", ""))
    for label, row in students.items():  # each row's numbers are those of the StudentNet its channels describe
        channels = ast.literal_eval(row["channels"])
        model = create_student("studentnet", channels=channels, num_classes=10, in_chans=1, num_pools=3)
        assert row["params"] == f"{count_params(model):,}" and row["MACs"] == f"{count_macs(model, x):,}"
        if label.startswith("width"):
            assert channels == create_student("studentnet", width_mult=float(label.split()[1])).channels
            assert not row["same channels as"]
        else:  # at most the width member's size; only the layers width_mult scales lose channels, rounded
            ranking, round_to = label.split()[0], int(label.split()[1][1:])
            assert count_params(model) <= size and channels[:3] == [16, 32, 64] and channels[7] == 256
            assert all(c % round_to == 0 for c in channels[3:7])
            if ranking == "layer":  # the shipped per-layer policy gives the width member's channels exactly
                assert row["same channels as"] == "width 0.5"
        if row["same channels as"]:
            assert row["channels"] == students[row["same channels as"]]["channels"]
    timed = [label for label, row in students.items() if not row["same channels as"]]
    assert "global r1 to 0.5" in timed  # odd channel counts are timed
    latency = {
        runtime: {row["student"]: row for row in rows}
        for runtime, (_, rows) in zip(runtimes, latency_tables, strict=True)
    }
    for rows in latency.values():
        assert list(rows) == timed
        for label, row in rows.items():
            assert float(row["b1 ms"]) > 0 and float(row["b3 ms"]) > 0
            width = rows["width 0.5"] if label != "width 1.0" else row  # the width member of its size
            assert _ratio_ok(row["/ width b3"], row["b3 ms"], width["b3 ms"])
    assert [row["student"] for row in ratios] == timed
    for row in ratios:  # int8 / float32, from the two tables
        int8, fp32 = latency["onnxruntime-int8"][row["student"]], latency["onnxruntime"][row["student"]]
        assert all(_ratio_ok(row[b], int8[f"{b} ms"], fp32[f"{b} ms"]) for b in ("b1", "b3"))
    profiles = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("- ")}
    assert list(profiles) == [f"- {runtime} global r1 to 0.5" for runtime in runtimes]  # one line per runtime
    assert "aten::" in profiles["- torch-cpu global r1 to 0.5"]
    assert "; graph " in profiles["- onnxruntime global r1 to 0.5"]
    assert "QuantizeLinear" in profiles["- onnxruntime-int8 global r1 to 0.5"]  # the quantized graph was profiled
