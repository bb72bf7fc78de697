"""Lightning callbacks that shrink the student between epochs. The teacher is never touched.

- :class:`NetworkSlimming`: L1 sparsity on BatchNorm scales (Liu et al. 2017).
- :class:`GroupLasso`: structured sparsity on whole filters and input channels (Wen et al. 2016, SSL).
- :class:`ChannelPruning`: removes channels physically at scheduled epoch ends, then training goes on
  with the smaller network.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from distill.data.batch import as_batch
from distill.profile import count_macs, count_params
from distill.pruning.importance import Importance
from distill.pruning.policy import CHANNEL_MULTIPLE, PruningPolicy, labelled_batches
from distill.pruning.schedule import PruningSchedule, PruningStep, ScheduleFn
from distill.pruning.surgery import PruneReport, channel_counts, check_target, prune_student, runnable_plan

__all__ = ["ChannelPruning", "GroupLasso", "NetworkSlimming"]


def _student(pl_module: pl.LightningModule) -> nn.Module:
    student = getattr(pl_module, "student", None)
    if not isinstance(student, nn.Module):
        raise ValueError(f"pruning callbacks act on a DistillModule's student; {type(pl_module).__name__} has none")
    return student


class _Penalty(Callback):
    """A sparsity penalty added to the student's gradients in the epochs ``[start_epoch, end_epoch)``."""

    def __init__(self, lambdas: dict[str, float], threshold: float, start_epoch: int, end_epoch: int | None) -> None:
        if not all(0 <= v < math.inf for v in (*lambdas.values(), threshold)):
            given = ", ".join(f"{k}={v}" for k, v in {**lambdas, "threshold": threshold}.items())
            raise ValueError(f"{' and '.join(lambdas)} and threshold must be finite and >= 0, got {given}")
        if start_epoch < 0 or (end_epoch is not None and end_epoch <= start_epoch):
            raise ValueError(f"need 0 <= start_epoch < end_epoch, got start_epoch={start_epoch}, end_epoch={end_epoch}")
        for name, value in lambdas.items():
            setattr(self, name, value)
        self.threshold, self.start_epoch, self.end_epoch = threshold, start_epoch, end_epoch

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)


class NetworkSlimming(_Penalty):
    """Sparsity on the student's BatchNorm scaling factors (Liu et al. 2017, network slimming).

    Training minimises ``loss + lambda_ * sum |gamma|`` over every BatchNorm of the student: the
    subgradient ``lambda_ * sign(gamma)`` is added to the gammas' gradients in
    ``on_before_optimizer_step``, where mixed-precision gradients are already unscaled. Channels
    whose gamma reaches zero can then be removed with ``ChannelPruning(importance="bn_scale")``.

    Logged each epoch: ``slimming/gamma_l1`` (sum |gamma|) and ``slimming/near_zero`` (how many gammas
    are below ``threshold``).

    Args:
        lambda_: strength of the L1 penalty (Liu et al.: 1e-4 to 1e-5).
        threshold: |gamma| under which a channel counts as near zero in the logs.
        start_epoch: first epoch with the penalty.
        end_epoch: first epoch without it again (``None``: until the end).
    """

    def __init__(
        self, lambda_: float = 1e-4, threshold: float = 1e-2, start_epoch: int = 0, end_epoch: int | None = None
    ) -> None:
        super().__init__({"lambda_": lambda_}, threshold, start_epoch, end_epoch)

    @staticmethod
    def gammas(student: nn.Module) -> list[nn.Parameter]:
        return [
            m.weight
            for m in student.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        student = _student(pl_module)
        if not self.gammas(student):  # else it trained an epoch for nothing, then failed on no scales to log
            raise ValueError(
                f"NetworkSlimming acts on BatchNorm scales, and the student ({type(student).__name__}) has no "
                f"BatchNorm layer with a learnable scale: use GroupLasso, or ChannelPruning with another importance "
                f"than bn_scale"
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.active(trainer.current_epoch):
            return
        for gamma in self.gammas(_student(pl_module)):
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma.detach()), alpha=self.lambda_)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gammas = torch.cat([g.detach().abs().flatten() for g in self.gammas(_student(pl_module))])
        pl_module.log("slimming/gamma_l1", gammas.sum(), sync_dist=False)
        pl_module.log("slimming/near_zero", (gammas < self.threshold).sum().float(), sync_dist=False)


class GroupLasso(_Penalty):
    """Structured sparsity learning (Wen et al. 2016, SSL) on the student's convolutions.

    Adds ``lambda_filter * sum_n ||W[n, :, :, :]||_2`` (filter-wise groups) and
    ``lambda_channel * sum_c ||W[:, c, :, :]||_2`` (channel-wise groups) to the loss, as its gradient
    ``lambda * W / ||group||`` in ``on_before_optimizer_step``. Whole filters and input channels are
    driven to zero, ready to be removed. Channel-wise groups skip depthwise convs (a filter is a
    channel there) and the first conv (its input channels are the image's).

    Logged each epoch: ``group_lasso/filter_norm`` (the sum of filter norms) and
    ``group_lasso/near_zero`` (how many filters have a norm below ``threshold``).

    Args:
        lambda_filter: strength of the filter-wise groups.
        lambda_channel: strength of the channel-wise groups.
        threshold: filter norm under which a filter counts as near zero in the logs.
        start_epoch: first epoch with the penalty.
        end_epoch: first epoch without it again (``None``: until the end).
    """

    def __init__(
        self,
        lambda_filter: float = 1e-4,
        lambda_channel: float = 0.0,
        threshold: float = 1e-3,
        start_epoch: int = 0,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__({"lambda_filter": lambda_filter, "lambda_channel": lambda_channel}, threshold, start_epoch,
                         end_epoch)  # fmt: skip
        if lambda_filter + lambda_channel == 0:
            raise ValueError("GroupLasso needs lambda_filter > 0 or lambda_channel > 0: with both 0 it does nothing")

    @staticmethod
    def convs(student: nn.Module) -> list[nn.Conv2d]:
        return [m for m in student.modules() if isinstance(m, nn.Conv2d)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        student = _student(pl_module)
        if not self.convs(student):
            raise ValueError(
                f"GroupLasso acts on 2-d convolutions, and the student ({type(student).__name__}) has none"
            )

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.active(trainer.current_epoch):
            return
        convs = self.convs(_student(pl_module))
        for i, conv in enumerate(convs):
            w, grad = conv.weight, conv.weight.grad
            if grad is None:
                continue
            if self.lambda_filter:
                norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
                grad.add_(w / norms.view(-1, 1, 1, 1), alpha=self.lambda_filter)
            if self.lambda_channel and conv.groups == 1 and i > 0:
                norms = w.transpose(0, 1).flatten(1).norm(dim=1).clamp_min(1e-12)
                grad.add_(w / norms.view(1, -1, 1, 1), alpha=self.lambda_channel)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norms = torch.cat([c.weight.detach().flatten(1).norm(dim=1) for c in self.convs(_student(pl_module))])
        pl_module.log("group_lasso/filter_norm", norms.sum(), sync_dist=False)
        pl_module.log("group_lasso/near_zero", (norms < self.threshold).sum().float(), sync_dist=False)


class ChannelPruning(Callback):
    """Remove student channels physically at scheduled epoch ends; training continues on the smaller net.

    At the end of each scheduled epoch the student is pruned with :func:`~distill.pruning.prune_student`
    (torch-pruning's dependency graph removes coupled channels together). Then the optimizers and LR
    schedulers are rebuilt for the new parameters through ``configure_optimizers``, at the schedule's
    current step, so the learning rate continues where it was. **Optimizer state (momentum, Adam
    moments) starts afresh** for the pruned parameters: it belonged to tensors that no longer exist.
    Under DDP the model is re-wrapped, and rank 0 decides the channels and broadcasts them, so every
    rank removes the same ones. The new layout reaches checkpoints through the student's spec, so a
    checkpoint reloads without this callback. Logged: ``prune/params``, ``prune/macs``.

    Args:
        importance: criterion name (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``) or a
            callable ``group -> scores``.
        schedule: a :class:`PruningSchedule`, or a function ``epoch -> ratio | PruningStep | None``.
        global_ranking: rank channels across layers instead of pruning each layer by the same ratio.
        min_channels: every layer keeps at least this many channels.
        min_fraction: every layer keeps at least this fraction of its channels at the start of training.
        round_to: kept channel counts are rounded up to a multiple of this (default :data:`CHANNEL_MULTIPLE`, what
            the runtimes run fast; 1: any count).
        ignored_layers: student layer names whose output channels must not change.
        num_batches: training batches the data-driven criteria (``taylor``, ``hrank``) look at.
        ignore_unprunable: keep the channels of layers whose pruning breaks the student (channels split by sizes
            fixed when it was built: MixNet, LeViT) and prune the rest, instead of refusing; the report names them.

    The arguments other than ``schedule`` form the :class:`~distill.pruning.PruningPolicy` ``self.policy``.
    """

    def __init__(
        self,
        importance: str | Importance = "l1",
        schedule: PruningSchedule | ScheduleFn | None = None,
        global_ranking: bool = False,
        min_channels: int = 1,
        min_fraction: float = 0.0,
        round_to: int = CHANNEL_MULTIPLE,
        ignored_layers: Sequence[str] = (),
        num_batches: int = 4,
        ignore_unprunable: bool = False,
    ) -> None:
        if schedule is None:
            raise ValueError("ChannelPruning needs a schedule, e.g. PruningSchedule(ratio=0.05, steps=10)")
        self.policy = PruningPolicy(importance, global_ranking, min_channels, min_fraction, round_to,
                                    ignored_layers, num_batches, ignore_unprunable)  # fmt: skip
        self.schedule = schedule
        self.initial: dict[str, Any] = {}
        self.reports: list[PruneReport] = []
        self.kept_layers: tuple[str, ...] = ()  # found to break the student, kept whole since (ignore_unprunable)
        self._checked: weakref.ref[nn.Module] | None = None  # the student :meth:`check` passed (an id may be reused)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_checked": None}  # a weak reference does not pickle (ddp_spawn sends callbacks)

    # -------------------------------------------------------------- helpers
    def check(self, student: nn.Module, example_input: torch.Tensor, channels: dict[str, int] | None = None) -> None:
        """Refuse, before training, layer names the student lacks and a size target it cannot reach.

        ``distill fit`` calls it before the Trainer exists; a new fit of a student not checked yet (from Python)
        calls it at its start. Otherwise a target out of reach failed at the first pruning step, after an epoch.
        """
        channels = channels or channel_counts(student, example_input, self.policy.ignored_layers)
        target_params = getattr(self.schedule, "target_params", None)  # a schedule may be any function of the epoch
        target_macs = getattr(self.schedule, "target_macs", None)
        if target_params is not None or target_macs is not None:
            name, target = (
                ("target_params", target_params) if target_params is not None else ("target_macs", target_macs)
            )
            have = count_params(student) if target_params is not None else count_macs(student, example_input)
            if target >= have:  # else every step found the student at its target and pruned nothing
                raise ValueError(f"ChannelPruning's schedule: {name}={target:,} must be below the student's current "
                                 f"{have:,}")  # fmt: skip
            check_target(student, example_input, self.policy, target_params=target_params, target_macs=target_macs,
                         floors=self.policy.floors(channels))  # fmt: skip
        self._checked = weakref.ref(student)

    @staticmethod
    def _example_input(trainer: pl.Trainer, student: nn.Module) -> torch.Tensor:
        device = next(student.parameters()).device
        data = trainer.datamodule
        if data is not None and hasattr(data, "input_size") and hasattr(data, "in_chans"):
            return torch.zeros(1, data.in_chans, *data.input_size, device=device)
        x = as_batch(next(iter(trainer.train_dataloader))).x
        return torch.zeros_like(x[:1], device=device)

    def _step(self, epoch: int) -> PruningStep | None:
        if isinstance(self.schedule, PruningSchedule):
            return self.schedule.step_at(epoch, self.initial["params"], self.initial["macs"])
        step = self.schedule(epoch)
        if step is None or isinstance(step, PruningStep):
            return step
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 <= step < 1:
            raise ValueError(f"ChannelPruning's schedule gave {step!r} for epoch {epoch}: give a ratio in [0, 1) (0: "
                             f"no pruning), a PruningStep or None")  # fmt: skip
        return PruningStep(ratio=float(step)) if step > 0 else None

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        if averaging:
            raise ValueError(
                f"ChannelPruning cannot train beside {averaging[0]}: the averaged copy keeps the unpruned shapes. "
                f"Average the weights in a fine-tuning run after pruning (e.g. prune-distill's rounds)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial:  # restored from a checkpoint: keep the sizes from before the first step
            return
        student = _student(pl_module)
        x = self._example_input(trainer, student)
        channels = channel_counts(student, x, self.policy.ignored_layers)
        if self._checked is None or self._checked() is not student:  # distill fit checked it before the Trainer
            self.check(student, x, channels)
        self._warn_past_the_end(trainer.max_epochs)
        self.initial = {"params": count_params(student), "macs": count_macs(student, x), "channels": channels}

    def _warn_past_the_end(self, max_epochs: int | None) -> None:
        """Warn where the schedule's steps run past the fit's last epoch: it would end short of its target."""
        if not isinstance(self.schedule, PruningSchedule) or max_epochs is None or max_epochs < 0:
            return
        late = [epoch for epoch in self.schedule.epochs() if epoch >= max_epochs]
        if late:
            rank_zero_warn(
                f"ChannelPruning's schedule prunes at the end of epochs {self.schedule.epochs()}, but the fit ends "
                f"after epoch {max_epochs - 1} (max_epochs={max_epochs}): {len(late)} of its {self.schedule.steps} "
                f"steps will not run, and the student ends short of the target. Raise max_epochs to at least "
                f"{late[-1] + 1}, or give the schedule fewer steps or an earlier start_epoch"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._step(trainer.current_epoch)
        if step is None:
            return
        student = _student(pl_module)
        x = self._example_input(trainer, student)
        if step.target_params is not None and count_params(student) <= step.target_params:
            return
        if step.target_macs is not None and count_macs(student, x) <= step.target_macs:
            return
        policy = self.policy.keeping(self.kept_layers)
        chosen: Any = None
        if trainer.is_global_zero:
            try:
                plan, policy = runnable_plan(
                    student,
                    x,
                    policy,
                    ratio=step.ratio,
                    target_params=step.target_params,
                    target_macs=step.target_macs,
                    floors=self.policy.floors(self.initial["channels"]),  # of the channels before the first step
                    data=labelled_batches(trainer.train_dataloader, self.policy.num_batches, x.device),
                )
                chosen = plan, policy.ignored_layers  # with the layers it had to keep (ignore_unprunable)
            except Exception as err:  # noqa: BLE001 - every rank raises it: the others would wait at the broadcast
                chosen = err
        chosen = trainer.strategy.broadcast(chosen, src=0)
        if isinstance(chosen, Exception):
            raise chosen
        plan, ignored = chosen
        self.kept_layers = tuple(name for name in ignored if name not in self.policy.ignored_layers)
        report = prune_student(student, x, self.policy.keeping(self.kept_layers), plan=plan)
        report.kept_layers = self.kept_layers
        self.reports.append(report)
        if callable(getattr(pl_module, "prepare_models", None)):
            pl_module.prepare_models()  # new weight tensors: channels_last again
        self._rebuild_training_state(trainer)
        pl_module.log("prune/params", float(report.params_after), sync_dist=False)
        pl_module.log("prune/macs", float(report.macs_after), sync_dist=False)
        rank_zero_info(f"ChannelPruning at the end of epoch {trainer.current_epoch}: {report}")

    @staticmethod
    def _rebuild_training_state(trainer: pl.Trainer) -> None:
        """New parameters need a new optimizer (and, under DDP, a new DDP wrapper)."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "kept_layers": list(self.kept_layers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict.get("initial", {})
        self.kept_layers = tuple(state_dict.get("kept_layers", ()))
