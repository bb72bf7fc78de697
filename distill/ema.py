"""An exponential moving average of the student's weights (Polyak & Juditsky 1992), updated without GPU syncs."""

from __future__ import annotations

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMA"]


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, with an update that never waits for the device.

    After each optimizer step every floating-point parameter and buffer moves towards the model's:
    ``average += (1 - decay) * (current - average)``, one ``torch._foreach_lerp_`` (integer buffers, e.g.
    BatchNorm's batch count, are copied). Validation, checkpoints (``state_dict`` holds the average,
    ``current_model_state`` the trained weights) and resuming are Lightning's. Torch's ``AveragedModel``,
    which ``EMAWeightAveraging`` updates with, reads its update count from the device twice per step (two
    GPU syncs, which stop the CPU from queueing the next step) and launches several kernels per tensor; here
    the count is kept on the host as well and read from the device once per fit.

    Args:
        decay: weight of the average at each update, in [0, 1).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: first step updated (earlier: none).
        update_starting_at_epoch: from this epoch on, also update at the end of each epoch.
        device: where the average lives (default: the model's device). Another device than the model's costs a
            copy of every tensor at each update.
        use_buffers: average the buffers too (BatchNorm statistics), as Lightning does by default; ``False``
            copies them from the model at each update, as torch's ``AveragedModel`` does.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | int | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0 <= decay < 1:  # 1 would keep the first step's weights, and evaluate and checkpoint those
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self.decay = float(decay)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # as WeightAveraging.setup, with the averaged model below
            if is_overridden("configure_model", pl_module):
                rank_zero_warn("EMA averages the layers configure_model builds, unsharded: memory may run out")
                pl_module.configure_model()
            device = pl_module.device if self._device is None else self._device  # not `or`: device 0 is falsy
            self._average_model = _LerpAverage(pl_module, device, self._use_buffers, self.decay)


class _LerpAverage(AveragedModel):
    """``AveragedModel`` updated by one foreach lerp, its count ``n_averaged`` also kept on the host.

    The tensor pairs are gathered at the first update after building or loading: parameters keep their identity
    through a fit (Lightning swaps and loads values in place, and ChannelPruning refuses to run beside an EMA).
    The average is copied from the model (without a DistillModule's teacher) when fit starts, before the module's
    setup may store it channels-last; the first update gives each averaged tensor its model tensor's layout, so the
    lerp runs on matching tensors.
    """

    def __init__(self, model: nn.Module, device: torch.device | int | None, use_buffers: bool, decay: float) -> None:
        held = {key: model.__dict__.pop(key) for key in ("_teacher",) if key in model.__dict__}
        try:  # DistillModule's held teacher is not copied: it is never averaged, and may be large
            super().__init__(model, device=device, use_buffers=use_buffers)
        finally:
            model.__dict__.update(held)
        self.decay = decay
        self.host_count: int | None = None
        self.averaged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (average's tensor, model's tensor)
        self.copied: list[tuple[torch.Tensor, torch.Tensor]] = []  # integer buffers, and buffers not averaged
        self.converted = False  # the model's tensors need another device or dtype than the average's

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.host_count = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def gather(self, model: nn.Module) -> None:
        """The pairs of tensors to average and to copy, the average's layout matched to the model's."""
        params = list(zip(self.module.parameters(), model.parameters(), strict=True))
        buffers = list(zip(self.module.buffers(), model.buffers(), strict=True))
        pairs = params + buffers if self.use_buffers else params
        self.averaged = [(a, m) for a, m in pairs if a.is_floating_point()]
        self.copied = [(a, m) for a, m in pairs if not a.is_floating_point()] + ([] if self.use_buffers else buffers)
        self.converted = any((a.device, a.dtype) != (m.device, m.dtype) for a, m in self.averaged + self.copied)
        for a, m in self.averaged + self.copied:
            if (a.device, a.dtype) == (m.device, m.dtype) and a.stride() != m.stride():
                a.data = torch.empty_like(m).copy_(a)  # e.g. channels-last, set on the model after the copy

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.host_count is None:
            self.host_count = int(self.n_averaged)  # one device read per fit
            self.gather(model)
        for pairs, lerp in ((self.averaged, self.host_count > 0), (self.copied, False)):
            if pairs:  # the first update copies everything
                ours = [a for a, _ in pairs]
                theirs = [m.to(a.device, a.dtype) for a, m in pairs] if self.converted else [m for _, m in pairs]
                if lerp:
                    torch._foreach_lerp_(ours, theirs, 1.0 - self.decay)
                else:
                    torch._foreach_copy_(ours, theirs)
        self.n_averaged += 1
        self.host_count += 1
