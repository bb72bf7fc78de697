"""DistillModule: what reaches the optimizer, the frozen teacher, checkpoints, early errors."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import fmnist, tiny_trainer

from distill import DistillModule, DKDLoss, KDLoss
from distill.optim import lr_factor
from students import create_student, load_student, save_student
from teachers import FrozenTeacher, TeacherEnsemble, load_teacher, weights_digest

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def student(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("test_studentnet", num_classes=10, in_chans=1, num_pools=3, **kwargs)


@pytest.mark.parametrize("frozen", [True, False], ids=["load_teacher", "a plain module"])
def test_kd_trains_the_student_and_never_the_teacher(tmp_path: Path, teacher_checkpoint: Path, frozen: bool):
    """A plain module given as the teacher is frozen too: in train mode, its BatchNorm statistics moved."""
    teacher = load_teacher(checkpoint=teacher_checkpoint)
    if not frozen:
        teacher = teacher.model.train().requires_grad_(True)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN statistics included
    model = DistillModule(student(), teacher, loss=KDLoss(temperature=4.0, alpha=0.9), lr=0.01)
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=fmnist())

    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"
    assert model.teacher_digest == weights_digest(teacher)  # the module given: an earlier run's resumes with it
    assert not torch.equal(model.student.state_dict()["cnn.0.0.weight"], student_before["cnn.0.0.weight"])
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.student.parameters()}
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/kd", "train/ce", "train/acc", "train/acc5", "val/acc", "val/acc5"} <= logged
    assert {"val/teacher_acc", "val/kd"} <= logged


def test_without_teacher_it_is_supervised_training(tmp_path: Path):
    model = DistillModule(student(), lr=0.01)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=fmnist())
    assert "train/kd" not in trainer.callback_metrics
    assert trainer.callback_metrics["train/loss"] == pytest.approx(trainer.callback_metrics["train/ce"].item())


def test_checkpoint_holds_the_student_only_and_reloads_in_a_fresh_process(tmp_path: Path, teacher_checkpoint: Path):
    loss = DKDLoss(temperature=3.0, nckd_weight=2.0)
    model = DistillModule(student(), load_teacher(checkpoint=teacher_checkpoint), loss=loss, lr=0.01)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=fmnist())
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    hparams = checkpoint["hyper_parameters"]
    assert hparams["teacher_checkpoint"] == str(teacher_checkpoint)
    assert hparams["student_spec"] == model.student.model_spec

    expected = model.student.eval()(X)
    torch.save(X, tmp_path / "x.pt")
    code = (
        "import sys, torch; from students import load_student; from distill import DistillModule\n"
        "x = torch.load(sys.argv[2]); a = load_student(sys.argv[1])(x)\n"
        "m = DistillModule.load_from_checkpoint(sys.argv[1]).eval(); b = m(x)\n"
        "torch.save(torch.stack([a, b]), sys.argv[3]); open(sys.argv[4], 'w').write(repr(m.loss))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), tmp_path / "loss"],
        check=True,
        cwd=Path(__file__).parents[1],
    )
    outputs = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=0)
    assert (tmp_path / "loss").read_text() == repr(loss)  # the same loss class and settings, to train on


def test_a_loss_the_checkpoint_cannot_record_is_named_when_reloaded():
    custom = DistillModule(student(), loss=torch.nn.Identity())
    assert custom.hparams.loss_spec == {"class_path": "torch.nn.modules.linear.Identity", "init_args": None}
    with pytest.warns(UserWarning, match=r"trained with torch.nn.modules.linear.Identity.*pass loss="):
        assert isinstance(DistillModule(student(), loss_spec=custom.hparams.loss_spec).loss, KDLoss)
    with pytest.raises(ValueError, match=r"loss_spec names os.system; only distill's losses"):
        DistillModule(student(), loss_spec={"class_path": "os.system", "init_args": {"command": "touch x"}})


def test_a_checkpoint_of_before_the_loss_weights_were_renamed_loads_as_it_trained():
    spec = {"class_path": "distill.DKDLoss", "init_args": {"temperature": 3.0, "alpha": 0.5, "beta": 2.0}}
    dkd = DistillModule(student(), loss_spec=spec).loss
    assert (dkd.temperature, dkd.tckd_weight, dkd.nckd_weight) == (3.0, 0.5, 2.0)
    dist = DistillModule(student(), loss_spec={"class_path": "distill.DISTLoss", "init_args": {"gamma": 3.0}}).loss
    assert (dist.inter_weight, dist.intra_weight) == (2.0, 3.0)


def test_mixup_needs_even_training_batches_only():
    model = DistillModule(student(), mixup={"mixup_alpha": 0.8})
    odd = fmnist(batch_size=33)
    odd.setup("fit")
    model.check_data(odd, fitting=False)  # evaluation never mixes
    with pytest.raises(ValueError, match="give an even batch_size, got 33"):  # every batch odd: it never mixed
        model.check_data(odd)


def test_training_resumes_from_a_checkpoint_without_teacher_weights(tmp_path: Path, teacher_checkpoint: Path):
    def make() -> DistillModule:
        return DistillModule(student(), load_teacher(checkpoint=teacher_checkpoint), lr=0.01)

    first = tiny_trainer(tmp_path, max_epochs=1)
    first.fit(make(), datamodule=fmnist())
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    second = tiny_trainer(tmp_path, max_epochs=2)
    second.fit(make(), datamodule=fmnist(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert second.global_step == 2 * first.global_step


def test_teacher_loads_from_teacher_checkpoint_at_setup(tmp_path: Path, teacher_checkpoint: Path):
    model = DistillModule(student(), teacher_checkpoint=str(teacher_checkpoint), lr=0.01)
    assert model.teacher is None
    tiny_trainer(tmp_path).fit(model, datamodule=fmnist())
    assert model.teacher is not None and model.teacher.checkpoint == str(teacher_checkpoint)


def test_ensemble_takes_the_loss_temperature(tmp_path: Path, teacher_checkpoint: Path):
    ensemble = TeacherEnsemble([load_teacher(checkpoint=teacher_checkpoint)] * 2, reduction="probs")
    model = DistillModule(student(), ensemble, loss=KDLoss(temperature=7.0), lr=0.01)
    tiny_trainer(tmp_path).fit(model, datamodule=fmnist())
    assert ensemble.temperature == 7.0
    # temperature None: the loss's, again when the teacher is loaded from the record
    recorded = {"teachers": [str(teacher_checkpoint)] * 2, "weights": [0.5, 0.5], "reduction": "probs"}
    assert model.hparams.teacher_checkpoint == {**recorded, "temperature": None}


def test_teacher_with_other_classes_fails_at_setup(tmp_path: Path):
    teacher = load_teacher("test_resnet", num_classes=11, in_chans=1)
    model = DistillModule(student(), teacher)
    with pytest.raises(ValueError, match=r"teacher predicts 11 classes but FashionMNISTDataModule .* has 10"):
        tiny_trainer(tmp_path).fit(model, datamodule=fmnist())


def test_student_with_other_input_channels_fails_at_setup(tmp_path: Path):
    torch.manual_seed(0)
    model = DistillModule(create_student("test_studentnet", num_classes=10, in_chans=3))
    with pytest.raises(ValueError, match=r"student cannot process a \(2, 1, 28, 28\) batch.*in_chans=1"):
        tiny_trainer(tmp_path).fit(model, datamodule=fmnist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"lr": 0.0}, "lr > 0"),
        ({"lr": float("nan")}, "need finite lr > 0.*lr=nan"),
        ({"lr": float("inf")}, "need finite lr > 0.*lr=inf"),
        ({"weight_decay": float("nan")}, "weight_decay=nan"),
        ({"momentum": 1.5}, "momentum < 1"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ],
)
def test_bad_settings(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        DistillModule(student(), **kwargs)
    with pytest.raises(ValueError, match="needs a student"):
        DistillModule()


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_factor(100, 100, warmup_steps=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(70, 100, schedule="constant") == 1.0
    assert lr_factor(30, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_load_student_needs_a_project_checkpoint(tmp_path: Path):
    torch.save(student().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="records no student_spec"):
        load_student(tmp_path / "plain.pt")


def test_a_student_built_without_a_model_spec_is_warned_of_and_its_checkpoint_names_the_fix(tmp_path: Path):
    """timm.create_model's student trained and saved, and nothing said that no checkpoint could rebuild it; then
    load_student said the file was not written by a DistillModule, and load_from_checkpoint asked for a student."""
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    with pytest.warns(UserWarning, match=r"student \(ResNet\) carries no model_spec: .* students.create_timm_model"):
        model = DistillModule(plain)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=fmnist())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"built without a model_spec \(e.g. by timm.create_model: build students wi"):
        load_student(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, student=<the module, built as before>\)"):
        DistillModule.load_from_checkpoint(tmp_path / "plain.ckpt")
    again = DistillModule.load_from_checkpoint(tmp_path / "plain.ckpt", student=timm.create_model("test_resnet",
                                               num_classes=10, in_chans=1))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_failed_save_student_leaves_the_earlier_file_and_a_bad_input_shape_is_refused(tmp_path: Path):
    """torch.save wrote straight onto the file: a record it could not pickle left 689 bytes of a 1 MB student. A
    numpy input_shape made a file load_student refused as unsafe, and one with the batch a file export refused."""
    path = save_student(student(), tmp_path / "student.ckpt", input_shape=(1, 28, 28))
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local function cannot be pickled
        save_student(student(), path, data=("X", {"split": {}, "batches": {}, "hook": lambda: 0}))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["student.ckpt"]
    for shape in ((1, 1, 28, 28), "1x28x28", (1, 28.5, 28)):
        with pytest.raises(ValueError, match=r"input_shape must be \[channels, height, width\] of whole numbers"):
            save_student(student(), tmp_path / "other.ckpt", input_shape=shape)
    assert load_student(save_student(student(), tmp_path / "np.ckpt", input_shape=np.array([1, 28, 28])))


def test_held_teacher_moves_and_casts_with_the_module(teacher_checkpoint: Path):
    model = DistillModule(student(), load_teacher(checkpoint=teacher_checkpoint))
    assert "teacher" not in dict(model.named_children())  # held, not owned
    assert not any(k.startswith("teacher") for k in model.state_dict())
    model.double()
    assert next(model.teacher.parameters()).dtype == torch.float64
    assert next(model.student.parameters()).dtype == torch.float64


def test_step_loss_is_logged_at_the_loggers_steps_and_epoch_means_once(tmp_path: Path):
    """Logging is per epoch (one log call per step costs ~0.5 ms); the step loss only where loggers write."""
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    class StepLosses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    spy = StepLosses()
    model = DistillModule(student(), lr=0.01)
    logger = CSVLogger(tmp_path, name="", version="v")
    trainer = tiny_trainer(
        tmp_path, limit_train_batches=10, limit_val_batches=0, log_every_n_steps=3, logger=logger, callbacks=[spy]
    )
    trainer.fit(model, datamodule=fmnist())
    rows = list(csv.DictReader((tmp_path / "v" / "metrics.csv").read_text().splitlines()))
    step_rows = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r["train/loss_step"]}
    assert list(step_rows) == [2, 5, 8]
    for step, value in step_rows.items():
        assert value == pytest.approx(spy.losses[step], rel=1e-6)
    epoch_rows = [r for r in rows if r["train/loss"]]
    assert len(epoch_rows) == 1  # one row of epoch means
    assert float(epoch_rows[0]["train/loss"]) == pytest.approx(sum(spy.losses) / 10, rel=1e-5)  # equal batches


def test_epoch_means_weigh_each_batch_by_its_size(tmp_path: Path):
    """val/loss, val/kd and val/ce are means over the images (15 batches of 32, then one of 1), by hand."""
    torch.manual_seed(1)
    teacher = FrozenTeacher(create_student("test_studentnet", num_classes=10, in_chans=1, num_pools=3))
    model = DistillModule(student(), teacher)
    dm = fmnist(val_size=481)
    logged = tiny_trainer(tmp_path, limit_val_batches=1.0).validate(model, datamodule=dm)[0]

    sums, count, batch_means = dict.fromkeys(("loss", "kd", "ce"), 0.0), 0, []
    with torch.no_grad():
        for x, y, *_ in dm.val_dataloader():
            terms = model.loss(model.student.eval()(x), teacher(x), y)
            sums = {name: total + terms[name].item() * len(y) for name, total in sums.items()}
            count += len(y)
            batch_means.append(terms["loss"].item())
    assert count == 481 and len(batch_means) == 16
    for name, total in sums.items():
        assert logged[f"val/{name}"] == pytest.approx(total / count, rel=1e-5)
    assert logged["val/loss"] != pytest.approx(sum(batch_means) / 16, rel=1e-5)  # not the mean of batch means


@pytest.mark.parametrize("case", ["buffers averaged", "buffers copied", "bfloat16 model", "channels-last model"])
def test_the_ema_update_is_torchs_average(case: str):
    """distill.EMA's update against torch's AveragedModel with the EMA function, as Lightning's callback builds it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from distill.ema import _LerpAverage

    torch.manual_seed(0)
    model = student()
    use_buffers = case != "buffers copied"
    ours = _LerpAverage(model, None, use_buffers=use_buffers, decay=0.75)
    theirs = AveragedModel(model, use_buffers=use_buffers, avg_fn=get_ema_avg_fn(0.75))
    if case == "bfloat16 model":  # true-precision training converts the model after the average was copied
        model.to(torch.bfloat16)
    if case == "channels-last model":  # as DistillModule's setup does on a GPU, after the callbacks' setup
        model.to(memory_format=torch.channels_last)
    for _ in range(4):
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.add_(torch.randn_like(tensor.float()).to(tensor.dtype) if tensor.is_floating_point() else 1)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        if key.endswith("num_batches_tracked") and use_buffers:
            assert torch.equal(a, model.state_dict()[key.removeprefix("module.")])  # copied, not averaged
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=key)
    if case == "channels-last model":  # the average took the model's layout: the lerp runs on matching tensors
        pairs = list(zip(ours.module.parameters(), model.parameters(), strict=True))
        assert any(m.stride() != torch.empty(m.shape).stride() for _, m in pairs)
        assert all(a.stride() == m.stride() for a, m in pairs)


def test_the_ema_does_not_copy_the_teacher():
    from distill.ema import _LerpAverage

    teacher = FrozenTeacher(student())
    model = DistillModule(student(), teacher)
    average = _LerpAverage(model, None, use_buffers=True, decay=0.9)
    assert model.teacher is teacher and average.module.teacher is None  # held by the model, absent from the copy
    assert average.module.state_dict().keys() == model.state_dict().keys()  # what checkpoints and swaps rely on


def test_an_ema_of_the_student_is_validated_saved_and_reloaded(tmp_path: Path):
    """distill.EMA on a DistillModule (issue 17): the average by hand; validation and checkpoints see it."""
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from distill import EMA
    from distill.pruning import ChannelPruning, PruningSchedule

    class Steps(Callback):  # the student after each optimizer step
        def __init__(self) -> None:
            self.weights: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.weights.append({k: v.clone() for k, v in pl_module.student.state_dict().items()})

    torch.manual_seed(0)
    model = DistillModule(student(), lr=0.05)
    steps = Steps()
    callbacks = [EMA(decay=0.75), steps, ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1)]
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=5, callbacks=callbacks,
                           enable_checkpointing=True)  # fmt: skip
    trainer.fit(model, datamodule=fmnist())
    first = tmp_path / "epoch=0.ckpt"  # written during training, after 5 steps
    saved = torch.load(first, map_location="cpu", weights_only=True)
    ema = {k.removeprefix("student."): v for k, v in saved["state_dict"].items() if k.startswith("student.")}
    raw = {k.removeprefix("student."): v for k, v in saved["current_model_state"].items() if k.startswith("student.")}
    for key, value in ema.items():  # the first step copied, then average + 0.25 * (weights - average) per step
        expected = steps.weights[0][key].clone()
        for weights in steps.weights[1:5]:
            expected = expected + 0.25 * (weights[key] - expected) if expected.is_floating_point() else weights[key]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(raw[key], steps.weights[4][key])  # the trained weights, for resuming
    assert int(saved["averaging_state"]["n_averaged"]) == 5
    reloaded = load_student(first).state_dict()  # the averaged student, from the file alone
    assert all(torch.equal(v, ema[k]) for k, v in reloaded.items())
    assert any(not torch.equal(v, raw[k]) for k, v in reloaded.items() if v.is_floating_point())

    pruning = ChannelPruning("l1", PruningSchedule(ratio=0.2))
    with pytest.raises(ValueError, match="ChannelPruning cannot train beside EMA"):
        tiny_trainer(tmp_path, callbacks=[EMA(), pruning]).fit(model, datamodule=fmnist())


def test_mixup_gives_the_teacher_the_students_mixed_images_and_the_loss_label_probabilities(tmp_path: Path):
    """timm's Mixup on each training batch (issue 17): the same mixed images reach both models."""
    seen: dict[str, list] = {"student": [], "teacher": [], "target": []}

    class Recording(KDLoss):
        def forward(self, student_logits, teacher_logits, target):
            seen["target"].append(target)
            return super().forward(student_logits, teacher_logits, target)

    torch.manual_seed(0)
    teacher = FrozenTeacher(create_student("test_studentnet", num_classes=10, in_chans=1))
    model = DistillModule(student(), teacher, loss=Recording(), mixup={"mixup_alpha": 1.0, "cutmix_alpha": 1.0})
    model.student.register_forward_pre_hook(lambda _, args: seen["student"].append(args[0].clone()))
    teacher.model.register_forward_pre_hook(lambda _, args: seen["teacher"].append(args[0].clone()))
    tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=fmnist())
    batches = {k: [v for v in values if len(v) == 32] for k, values in seen.items()}  # not setup's dummy batch
    assert len(batches["target"]) == 2
    for x_s, x_t, target in zip(batches["student"], batches["teacher"], batches["target"], strict=True):
        assert torch.equal(x_s, x_t)  # one view for both models
        assert target.shape == (32, 10) and torch.allclose(target.sum(-1), torch.ones(32))
        assert (target.max(-1).values < 1).any()  # images mixed with another class (pairs of one class sum to 1)
    with pytest.raises(ValueError, match=r"mixup takes timm\.data\.Mixup's arguments"):
        DistillModule(student(), mixup={"alpha": 1.0})
