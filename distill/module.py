"""DistillModule: a student trained from a frozen teacher (or from labels alone) in Lightning.

Knowledge distillation after Hinton, Vinyals, Dean 2015. With no teacher it is plain supervised
training, which is how this project trains teachers.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any, Literal, get_args

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill import losses
from distill.data.base import check_trained_data
from distill.data.batch import Batch, as_batch
from distill.losses import KDLoss
from distill.optim import OPTIMIZERS, SCHEDULES, build_optimizer, check_resume_settings, lr_factor, param_groups
from students.checkpoint import (
    build_student,
    describe_spec,
    extract_state_dict,
    is_pruned_from,
    record_rng_states,
    record_student,
    recorded_spec,
    restore_rng_states,
)
from students.modes import eval_mode
from teachers import FrozenModule, FrozenTeacher, TeacherEnsemble, load_teachers, teacher_checkpoints, weights_digest

__all__ = ["TEACHER_DIGEST_KEY", "DistillModule", "check_resume_settings"]  # check_resume_settings: distill.optim

#: The checkpoint key of the teacher's :func:`teachers.weights_digest` (``None``: trained without a teacher).
TEACHER_DIGEST_KEY = "teacher_digest"

#: ``torch.compile``'s modes (``compile=True`` is ``"default"``).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class DistillModule(LightningModule):
    """Train ``student`` on labels and, when a teacher is given, on the teacher's soft labels.

    Only the student's parameters reach the optimizer. The teacher is frozen (eval mode, no
    gradients) and is held, not owned: it is not a registered submodule, so it is never written into
    checkpoints, never handed to an optimizer or DDP, yet it moves with the module (``.to()``,
    precision casts). Its checkpoint path is recorded in the hyperparameters (``teacher_checkpoint``),
    and the student's architecture, including a pruned channel layout, in ``student_spec``, so
    ``DistillModule.load_from_checkpoint(path)`` and ``students.load_student(path)`` rebuild the
    student from the file alone.

    Args:
        student: the network to train (e.g. ``students.StudentNet`` or ``students.create_timm_model``).
        teacher: a frozen teacher (``teachers.load_teacher``, ``teachers.TeacherEnsemble``; another module is
            wrapped in ``teachers.FrozenTeacher``, which freezes it); ``None`` trains
            on labels only, or loads the teacher from ``teacher_checkpoint`` at setup.
        loss: the training loss; default ``KDLoss(temperature=4.0, alpha=0.9)`` (cross-entropy alone
            when there is no teacher). Checkpoints record the settings of :mod:`distill.losses`' classes
            (``loss_spec``), so ``load_from_checkpoint(path)`` rebuilds the same loss.
        optimizer: ``sgd`` (Nesterov momentum), ``adamw`` or ``adam``.
        lr: peak learning rate.
        weight_decay: weight decay of conv and linear weights (none on biases and BatchNorm).
        momentum: SGD momentum.
        scheduler: ``cosine`` (decay to ``min_lr_ratio * lr`` over the run, stepped every batch) or ``constant``.
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.
        student_spec: rebuild the student from this ``{"name", "kwargs"}`` spec when ``student`` is not given
            (checkpoints record it; you rarely set it by hand).
        loss_spec: rebuild the loss from this ``{"class_path", "init_args"}`` record when ``loss`` is not given
            (checkpoints record it; only :mod:`distill.losses`' classes are rebuilt from it).
        teacher_checkpoint: the teacher's checkpoint file(s), or :func:`teachers.load_teacher`'s arguments
            where a file does not name its architecture. Recorded automatically from ``teacher``; when
            ``teacher`` is not given, the teacher is loaded from here at setup (a list gives an ensemble).
        channels_last: store conv weights and inputs channels-last (NHWC), which tensor-core kernels prefer.
            ``None`` (default): on when training on a GPU, off on the CPU.
        compile: ``torch.compile`` the student and the teacher in place (``nn.Module.compile``: checkpoint keys
            do not change). The first steps are slow while it compiles; a pruned student recompiles. ``True``
            uses torch's default mode; a mode name picks another: ``"reduce-overhead"`` replays CUDA graphs
            (fewer kernel launches, for small models on a GPU), ``"max-autotune"`` also searches kernels.
        mixup: mixup/cutmix of each training batch, ``timm.data.Mixup``'s arguments (``mixup_alpha``,
            ``cutmix_alpha``, ``prob``, ``switch_prob``, ...; its ``label_smoothing`` defaults to 0 here). The
            teacher sees the student's mixed images ("consistent" teaching, Beyer et al., CVPR 2022), the loss
            gets the mixed label probabilities as its target, and ``TeacherLogitCache`` leaves the training
            split live. A batch of odd size is left unmixed (timm mixes image pairs).
    """

    def __init__(
        self,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        loss: nn.Module | None = None,
        optimizer: Literal["sgd", "adamw", "adam"] = "adamw",
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        student_spec: dict[str, Any] | None = None,
        loss_spec: dict[str, Any] | None = None,
        teacher_checkpoint: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
        channels_last: bool | None = None,
        compile: bool | CompileMode = False,
        mixup: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULES)}, got {scheduler!r}")
        numbers = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "warmup_epochs": warmup_epochs}
        if not all(math.isfinite(v) for v in numbers.values()) or not (
            lr > 0 and weight_decay >= 0 and 0 <= momentum < 1 and warmup_epochs >= 0 and 0 <= min_lr_ratio <= 1
        ):
            raise ValueError(
                "need finite lr > 0, weight_decay >= 0, 0 <= momentum < 1, warmup_epochs >= 0 and "
                f"0 <= min_lr_ratio <= 1; got {', '.join(f'{k}={v}' for k, v in numbers.items())}, "
                f"min_lr_ratio={min_lr_ratio}"
            )
        if isinstance(compile, str) and compile not in get_args(CompileMode):
            modes = ", ".join(get_args(CompileMode))
            raise ValueError(f"compile must be true, false or a torch.compile mode ({modes}); got {compile!r}")
        if student is None:
            if student_spec is None:
                raise ValueError(
                    "DistillModule needs a student (a module) or a student_spec to build one from. A checkpoint "
                    "without one had a student built without a model_spec (e.g. timm.create_model): pass "
                    "load_from_checkpoint(path, student=<the module, built as before>)"
                )
            student = build_student(student_spec)
        elif getattr(student, "model_spec", None) is None and student_spec is None:
            rank_zero_warn(
                f"The student ({type(student).__name__}) carries no model_spec: checkpoints hold its weights, but "
                f"students.load_student, DistillModule.load_from_checkpoint and distill test/predict/export cannot "
                f"rebuild it from them. Build it with students.create_timm_model(name, ...) or "
                f"students.create_student(...) instead"
            )
        plain_teacher = teacher is not None and not isinstance(teacher, FrozenModule)
        if teacher is not None:
            teacher_checkpoint = teacher_checkpoints(teacher) or teacher_checkpoint
        if loss is None:
            loss = _recorded_loss(loss_spec) if loss_spec is not None else KDLoss()
        # Hyperparameters are plain values only, so checkpoints load with weights_only=True and
        # `load_from_checkpoint(path)` rebuilds the student from `student_spec`.
        self.save_hyperparameters(
            {
                "optimizer": optimizer,
                "lr": lr,
                "weight_decay": weight_decay,
                "momentum": momentum,
                "scheduler": scheduler,
                "warmup_epochs": warmup_epochs,
                "min_lr_ratio": min_lr_ratio,
                "student_spec": getattr(student, "model_spec", student_spec),
                "loss_spec": _loss_record(loss),
                "teacher_checkpoint": teacher_checkpoint,
                "channels_last": channels_last,
                "compile": compile,
                "mixup": mixup,
            }
        )
        self.student = student
        self._built_spec = copy.deepcopy(getattr(student, "model_spec", None))  # before any pruning
        # a plain module is frozen here (in train mode, its BatchNorm statistics moved); its digest stays its own
        self._set_teacher(FrozenTeacher(teacher) if plain_teacher else teacher, digest_of=teacher)
        self.loss = loss
        self.mixer = _mixer(mixup, getattr(student, "num_classes", None))
        self.metrics = nn.ModuleDict()  # accuracies per model and stage, made at setup
        self.loss_means = nn.ModuleDict()  # "{stage}/{term}": the epoch's mean of a loss term, made at first use
        self.input_shape: list[int] | None = None  # (C, H, W) of the data, known at setup
        self.memory_format = torch.contiguous_format  # of the inputs; channels_last when set so, at setup

    # ---------------------------------------------------------------- teacher
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, or ``None``."""
        return self.__dict__.get("_teacher")

    def _set_teacher(self, teacher: nn.Module | None, digest_of: nn.Module | None = None) -> None:
        """Hold ``teacher``; ``digest_of``: the module whose digest is the teacher's (a plain module it wraps)."""
        object.__setattr__(self, "_teacher", teacher)  # bypass nn.Module registration on purpose
        object.__setattr__(self, "_digest_of", digest_of or teacher)
        object.__setattr__(self, "_teacher_digest", None)  # its weights_digest, taken before any cast or compile

    @property
    def teacher_digest(self) -> str | None:
        """:func:`teachers.weights_digest` of the teacher as loaded (``None`` without one); checkpoints record it, so
        that a fit resumed with another teacher is refused."""
        if self.teacher is not None and self._teacher_digest is None:
            object.__setattr__(self, "_teacher_digest", weights_digest(self._digest_of))
        return self._teacher_digest

    def _apply(self, fn: Any, recurse: bool = True) -> DistillModule:
        """Move and cast the held teacher together with the module (``.to(device)``, ``.half()``, ...)."""
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = self.check_data(datamodule, fitting=stage == "fit")
        if not self.metrics:
            self.metrics = nn.ModuleDict(
                {f"student_{s}": _accuracy(num_classes, f"{s}/") for s in ("train", "val", "test")}
            )
            for s in ("val", "test"):
                self.metrics[f"teacher_{s}"] = _accuracy(num_classes, f"{s}/teacher_")
        self.prepare_models()

    def prepare_models(self) -> None:
        """Apply ``channels_last`` and ``compile`` to student and teacher.

        Called at setup, and again by ``ChannelPruning`` after surgery has replaced the student's weights.
        """
        channels_last = self.hparams.get("channels_last")
        if channels_last is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            channels_last = device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for model in (self.student, self.teacher):
            if model is None:
                continue
            if channels_last:
                model.to(memory_format=torch.channels_last)
            compile = self.hparams.get("compile")
            if compile and getattr(model, "_compiled_call_impl", None) is None:
                model.compile(mode=compile if isinstance(compile, str) else None)

    def check_data(self, datamodule: Any, fitting: bool = True) -> int:
        """Load the teacher if only its checkpoint is known; run student and teacher on a dummy batch shaped
        like ``datamodule``'s and fail early and clearly on a mismatch. Returns the number of classes.

        ``distill fit`` calls it before the Trainer exists, so that bad input changes nothing on disk;
        ``setup`` calls it again for runs started from Python. ``fitting``: the data is for training (mixup
        needs even batches; evaluation never mixes).
        """
        if self.teacher is None and self.hparams.teacher_checkpoint:
            self._set_teacher(load_teachers(self.hparams.teacher_checkpoint).to(_device_of(self.student)))
        if isinstance(self.teacher, TeacherEnsemble) and self.teacher.temperature is None:
            self.teacher.temperature = getattr(self.loss, "temperature", None)
        if fitting:
            _ = self.teacher_digest  # taken now, for the checkpoints: a precision plugin may cast the teacher later
        student_classes = getattr(self.student, "num_classes", None)
        if datamodule is None or not hasattr(datamodule, "input_size"):
            if student_classes is None:
                raise ValueError("Cannot tell the number of classes: use a datamodule with num_classes")
            return student_classes
        self.input_shape = [datamodule.in_chans, *datamodule.input_size]  # recorded in checkpoints, for export
        shape = (2, *self.input_shape)
        data_desc = f"{type(datamodule).__name__} ({datamodule.num_classes} classes, {datamodule.in_chans} channels)"
        outputs = {}
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if model is None:
                continue
            try:
                with torch.no_grad(), eval_mode(model):
                    out = outputs[role] = model(torch.zeros(shape, device=_device_of(model)))
            except RuntimeError as err:
                raise ValueError(
                    f"The {role} cannot process a {tuple(shape)} batch from {data_desc}: {err}. "
                    f"Build the {role} with in_chans={datamodule.in_chans}, for inputs of "
                    f"{datamodule.input_size[0]}x{datamodule.input_size[1]} (or give the data a size it takes)."
                ) from None
            if out.shape[-1] != datamodule.num_classes:
                fix = (
                    "Use a teacher trained on this dataset."
                    if role == "teacher"
                    else f"Build the student with num_classes={datamodule.num_classes}."
                )
                raise ValueError(
                    f"The {role} predicts {out.shape[-1]} classes but {data_desc} has {datamodule.num_classes}. {fix}"
                )
        self._check_teacher_data(datamodule, data_desc)
        batch_size = getattr(datamodule, "batch_size", None)
        if fitting and self.mixer is not None and isinstance(batch_size, int) and batch_size % 2:
            raise ValueError(f"mixup mixes each batch with itself reversed: give an even batch_size, got {batch_size}")
        target = torch.zeros(len(outputs["student"]), dtype=torch.long, device=outputs["student"].device)
        try:
            terms = self.loss(outputs["student"], outputs.get("teacher"), target)
            ok = isinstance(terms, dict) and isinstance(terms.get("loss"), torch.Tensor)
        except (TypeError, RuntimeError) as err:
            ok, terms = False, err
        if not ok:
            raise ValueError(
                f"model.loss {type(self.loss).__name__} must be called as loss(student_logits, teacher_logits, "
                f"target) and return a dict with 'loss', as distill.KDLoss does; got {str(terms).splitlines()[0]}"
            )
        return datamodule.num_classes

    def _check_teacher_data(self, datamodule: Any, data_desc: str) -> None:
        """Refuse a teacher trained on other classes or another normalisation than ``datamodule``'s (where its
        checkpoint records its data, as ``distill fit`` writes it): its soft labels would teach wrong answers at
        full confidence. Another input size only warns: a teacher scored at another resolution is a choice."""
        for member in _members(self.teacher):
            if getattr(member, "trained_on", None) is not None:
                which = f"The teacher {member.checkpoint}" if member.checkpoint else "The teacher"
                check_trained_data(
                    which, member.trained_on, datamodule,
                    "its soft labels on this data would be wrong. Use a teacher trained on this data, or give the data "
                    "the teacher's classes and normalisation.",
                    "a teacher usually scores lower at another size than its own (val/teacher_acc shows how much)",
                )  # fmt: skip

    # --------------------------------------------------------------- training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _shared_step(self, batch: Batch | tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        """One batch: the loss terms and accuracies are accumulated on the device, logged once per epoch.

        Each ``self.log`` call costs Lightning about half a millisecond of Python, more than a whole
        StudentNet step on a GPU; only the training loss is logged during the epoch, every
        ``log_every_n_steps`` steps (when the loggers write too), for the progress bar.
        """
        batch = as_batch(batch)
        x, y = batch.x.contiguous(memory_format=self.memory_format), batch.y
        teacher_logits = batch.teacher_logits  # served by distill.cache.TeacherLogitCache, else computed here
        target = y
        if stage == "train" and self.mixer is not None and len(y) % 2 == 0:
            x, target = self.mixer(x.clone(), y)  # the teacher sees the mixed images too
            y, teacher_logits = target.argmax(-1), None
        if teacher_logits is None and self.teacher is not None:
            teacher_logits = self.teacher(x)
        logits = self.student(x)
        terms = self.loss(logits, teacher_logits, target)
        if stage == "train" and (self.global_step + 1) % self._log_every == 0:  # the steps the loggers write
            # Shown by the progress bar, which reads it as a Python float: a GPU sync, so not at every step.
            self.log("train/loss_step", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False)
        for name, value in terms.items():  # the loss's own terms (KDLoss: loss, kd, ce; no kd without a teacher)
            key = f"{stage}/{name}"
            if key not in self.loss_means:
                self.loss_means[key] = _batch_mean().to(value.device)
            # Weighted by the batch size as the value repeated len(y) times: MeanMetric's `weight` is dropped
            # under nan_strategy="disable" (torchmetrics#3434), and the other strategies sync at every step.
            self.loss_means[key].update(value.detach().float().expand(len(y)))
        self.metrics[f"student_{stage}"].update(logits.detach(), y)
        if teacher_logits is not None and stage != "train":
            self.metrics[f"teacher_{stage}"].update(teacher_logits, y)
        return terms["loss"]

    @property
    def _log_every(self) -> int:
        return max(1, self._trainer.log_every_n_steps) if self._trainer is not None else 1

    def _start_epoch(self, stage: str) -> None:
        """Reset the stage's loss means and accuracies (nothing is left from an epoch that did not end)."""
        means = [m for key, m in self.loss_means.items() if key.startswith(f"{stage}/")]
        for metric in [*means, *(m for key, m in self.metrics.items() if key.endswith(f"_{stage}"))]:
            metric.reset()

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's mean loss terms and accuracies as ``{stage}/loss``, ``{stage}/acc``, ..., then reset them."""
        values = {k: m.compute() for k, m in self.loss_means.items() if k.startswith(f"{stage}/") and m.update_called}
        for key, metrics in self.metrics.items():
            if values and key.endswith(f"_{stage}") and any(m.update_called for m in metrics.values()):
                values |= metrics.compute()  # torchmetrics gathers the sums and counts of all processes
        self._start_epoch(stage)
        if values:
            self.log_dict(values, prog_bar=stage == "val", sync_dist=True)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Batch | tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The student's logits for the batch's images (``distill predict`` writes them: PredictionWriter)."""
        return self.student(as_batch(batch).x.contiguous(memory_format=self.memory_format))

    def on_train_epoch_start(self) -> None:
        self._start_epoch("train")
        if hasattr(self.loss, "set_epoch"):  # a loss that ramps a term in over epochs (DKDLoss)
            self.loss.set_epoch(self.current_epoch)
        for logger in self.loggers:  # the last epoch's rows reach the disk before this epoch can be killed
            logger.save()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._start_epoch("val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._start_epoch("test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = build_optimizer(param_groups(self.student, hp.weight_decay), hp.optimizer, hp.lr, hp.momentum)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = hp.warmup_epochs * per_epoch
        if warmup > total:
            rank_zero_warn(f"warmup_epochs={hp.warmup_epochs} is longer than the run: the lr never reaches its peak")
        schedule = partial(
            lr_factor,
            total_steps=total,
            warmup_steps=min(total, int(warmup)) if warmup < math.inf else total,
            schedule=hp.scheduler,
            min_ratio=hp.min_lr_ratio,
        )
        # Built again mid-run when pruning replaces the parameters: continue at the current step.
        step = self.trainer.global_step
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=step - 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints
    def check_checkpoint(self, checkpoint: Mapping[str, Any], source: str) -> None:
        """Refuse a checkpoint whose student is neither the one this module was built with nor a pruned version.

        Loading it would silently replace the student (``on_load_checkpoint`` rebuilds the recorded one).
        """
        spec = recorded_spec(checkpoint, source)
        own = self._built_spec
        if spec is not None and own is not None and not is_pruned_from(spec, own):
            raise ValueError(
                f"{source} holds the student {describe_spec(spec)}, but this run builds {describe_spec(own)}. "
                f"Use the config that wrote it (config.yaml in its folder; its data and student); to train from "
                f"its weights instead, set model.student to students.load_student with init_args {{path: ..., "
                f"train: true}}."
            )

    def check_resumed_objective(self, checkpoint: Mapping[str, Any], source: str, mixup: Any) -> None:
        """Refuse to resume ``checkpoint`` with another loss (class or settings) or mixup (``mixup``: this run's, as
        configured) than it was trained with: the objective would change half-way through the run."""
        recorded = checkpoint.get("hyper_parameters") or {}
        spec = recorded.get("loss_spec")
        was = {"mixup": _mixup_settings(recorded.get("mixup"))} if "mixup" in recorded else {}
        if isinstance(spec, Mapping) and spec.get("init_args") is not None:  # a loss of the user's own says nothing
            was["loss"] = _loss_record(_recorded_loss(spec))  # old checkpoints' settings under their new names
        now = {"mixup": _mixup_settings(mixup), "loss": self.hparams.get("loss_spec")}
        changed = [k for k in was if was[k] != now[k]]
        if changed:
            raise ValueError(
                f"{source} was trained with {', '.join(f'{k}={was[k]}' for k in changed)}, but this run has "
                f"{', '.join(f'{k}={now[k]}' for k in changed)}: the objective would change half-way through the run. "
                f"Resume with the original settings, or start a new run."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the student's architecture (it changes when pruned), the input shape, the teacher's digest and the
        RNG states."""
        record_student(checkpoint, self.student, self.input_shape)
        checkpoint[TEACHER_DIGEST_KEY] = self.teacher_digest
        record_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the student if the checkpoint records a pruned layout; resuming, restore the RNG states.

        With the random states of torch, numpy and Python restored, a resumed fit shuffles and augments
        exactly as the uninterrupted run did, so it ends with the same weights.
        """
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if self._trainer is not None:
            self.check_checkpoint(checkpoint, "The checkpoint")
        if fitting:
            check_resume_settings(checkpoint, self.hparams, "The checkpoint")
        spec = recorded_spec(checkpoint)
        if spec is not None and (spec.get("pruned") or spec != getattr(self.student, "model_spec", None)):
            student = build_student(spec, extract_state_dict(checkpoint))
            self.student = student.to(_device_of(self.student))
        if fitting:
            restore_rng_states(checkpoint)


def _loss_record(loss: nn.Module) -> dict[str, Any]:
    """The loss's ``{"class_path", "init_args"}``; ``init_args`` is ``None`` for a class that cannot say its own."""
    if type(loss).__module__ == losses.__name__ and type(loss).__name__ in losses.__all__:
        return loss.spec
    return {"class_path": f"{type(loss).__module__}.{type(loss).__qualname__}", "init_args": None}


#: Loss settings renamed after the term they weigh (2026-12-06), by class: the old name, the new one.
_RENAMED_LOSS_ARGS = {
    "DKDLoss": {"alpha": "tckd_weight", "beta": "nckd_weight"},
    "DISTLoss": {"beta": "inter_weight", "gamma": "intra_weight"},
}


def _recorded_loss(spec: Mapping[str, Any]) -> nn.Module:
    """The loss a checkpoint records (only distill's classes: a checkpoint names no other code to run)."""
    class_path = str(spec.get("class_path"))
    name = class_path.rsplit(".", 1)[-1]
    if spec.get("init_args") is None:  # a loss of the user's own: its settings are not in the file
        rank_zero_warn(
            f"The checkpoint was trained with {class_path}, whose settings it does not record: this module uses "
            f"KDLoss(); pass loss=... (e.g. to load_from_checkpoint) to train or validate with the original."
        )
        return KDLoss()
    if not class_path.startswith("distill.") or name not in losses.__all__:
        raise ValueError(
            f"loss_spec names {class_path}; only distill's losses ({', '.join(losses.__all__)}) are rebuilt from a "
            f"record. Give model.loss instead."
        )
    renamed = _RENAMED_LOSS_ARGS.get(name, {})  # a checkpoint of before the rename loads as it trained
    try:
        return getattr(losses, name)(**{renamed.get(k, k): v for k, v in spec["init_args"].items()})
    except TypeError as err:  # settings the class does not take
        raise ValueError(f"loss_spec {dict(spec)} does not build {name}: {err}") from None


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (in ``setup`` they may not have moved to ``self.device`` yet)."""
    return next(model.parameters(), torch.empty(0)).device


def _members(teacher: nn.Module | None) -> Iterator[nn.Module]:
    """The teachers an ensemble holds, at any depth (an ensemble of ensembles); a single teacher itself."""
    if isinstance(teacher, TeacherEnsemble):
        for member in teacher.teachers:
            yield from _members(member)
    elif teacher is not None:
        yield teacher


def _mixer(options: dict[str, Any] | None, num_classes: int | None) -> Any:
    """``timm.data.Mixup`` with ``options`` (label smoothing 0 unless given), or ``None``."""
    if not options:
        return None
    from timm.data import Mixup

    if num_classes is None:
        raise ValueError("mixup needs a student with num_classes (its targets are label probabilities)")
    minmax = options.get("cutmix_minmax")  # timm asserts its length; checked here with its range
    if minmax is not None and not (isinstance(minmax, (list, tuple)) and len(minmax) == 2 and
                                   _within(minmax[0], 0, 1) and _within(minmax[1], minmax[0], 1)):  # fmt: skip
        raise ValueError(f"mixup: cutmix_minmax must be [min, max] with 0 <= min <= max <= 1, got {minmax!r}")
    try:
        mixer = Mixup(**{**_mixup_settings(options), "num_classes": num_classes})
    except TypeError as err:
        raise ValueError(f"mixup takes timm.data.Mixup's arguments (mixup_alpha, cutmix_alpha, ...): {err}") from None
    _check_mixer(mixer)
    return mixer


def _mixup_settings(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``options`` with timm's ``Mixup`` defaults filled in, label smoothing 0 unless given: what :func:`_mixer` builds
    with, and what two runs' settings are compared by."""
    if not options:
        return None
    from timm.data import Mixup

    defaults = {k: p.default for k, p in inspect.signature(Mixup).parameters.items() if p.default is not p.empty}
    return {**defaults, "label_smoothing": 0.0, **options}


def _within(value: Any, low: float, high: float, high_open: bool = False) -> bool:
    """Whether ``value`` is a number in ``[low, high]`` (``[low, high)`` with ``high_open``; NaN is not)."""
    return isinstance(value, (int, float)) and low <= value <= high and not (high_open and value == high)


def _check_mixer(mixer: Any) -> None:
    """Refuse settings timm's ``Mixup`` takes but fails on at the first step (an assertion) or applies wrongly."""
    for name in ("mixup_alpha", "cutmix_alpha"):
        if not _within(getattr(mixer, name), 0.0, math.inf, high_open=True):
            raise ValueError(f"mixup: {name} must be a finite number >= 0, got {getattr(mixer, name)!r}")
    if mixer.mixup_alpha == 0 and mixer.cutmix_alpha == 0:
        raise ValueError("mixup: mixup_alpha, cutmix_alpha or cutmix_minmax must be set (> 0): this mixes nothing")
    for name, value in (("prob", mixer.mix_prob), ("switch_prob", mixer.switch_prob)):
        if not _within(value, 0.0, 1.0):
            raise ValueError(f"mixup: {name} must be in [0, 1], got {value!r}")
    if not _within(mixer.label_smoothing, 0.0, 1.0, high_open=True):
        raise ValueError(f"mixup: label_smoothing must be in [0, 1), got {mixer.label_smoothing!r}")
    if mixer.mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mixup: mode must be batch, pair or elem, got {mixer.mode!r}")


def _batch_mean() -> MeanMetric:
    """The mean of a loss term over an epoch's examples (no NaN check: a NaN loss shows in the log)."""
    return MeanMetric(nan_strategy="disable")


def _accuracy(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy, and top-5 where there are at least 5 classes."""
    # validate_args=False: the checks call torch.unique on the labels, a device sync at every step.
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)}
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
    return MetricCollection(metrics, prefix=prefix)
