"""An ensemble of frozen teachers whose combined output the student imitates (seed 004, section 1.2).

Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network": the soft targets of an
ensemble are the (weighted) mean of its members' predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from teachers.frozen import FrozenModule, FrozenTeacher

__all__ = ["TeacherEnsemble"]


class TeacherEnsemble(FrozenModule):
    """Combine several teachers into one frozen teacher that returns logits.

    Args:
        teachers: the member teachers (wrapped in :class:`FrozenTeacher` if they are not frozen yet).
        weights: one non-negative weight per teacher (normalised to sum to 1); equal weights if omitted.
        reduction: ``"logits"`` averages the logits. ``"probs"`` averages the probabilities at the
            temperature T and returns ``T * log(mean_k w_k softmax(z_k / T))``, logits whose softmax at
            T is exactly that mean.
        temperature: T for ``"probs"``. ``None`` uses the KD loss's temperature (``DistillModule`` sets it);
            1.0 when the ensemble is used on its own.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        reduction: Literal["logits", "probs"] = "logits",
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        if reduction not in ("logits", "probs"):
            raise ValueError(f"reduction must be 'logits' or 'probs', got {reduction!r}")
        if temperature is not None and not 1e-19 < temperature < 1e19:  # T * log p stays within float32
            raise ValueError(f"temperature must be a finite number > 0 (1e-19 to 1e19), got {temperature}")
        if weights is None:
            weights = [1.0] * len(teachers)
        if len(weights) != len(teachers) or not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"weights must be {len(teachers)} non-negative numbers with a positive sum (one per teacher), "
                f"got {list(weights)}"
            )
        self.teachers = nn.ModuleList(t if isinstance(t, FrozenModule) else FrozenTeacher(t) for t in teachers)
        classes = {getattr(t, "num_classes", None) for t in self.teachers} - {None}
        if len(classes) > 1:
            raise ValueError(f"All teachers of an ensemble must predict the same classes, got class counts {classes}")
        self.register_buffer("weights", torch.tensor([w / sum(weights) for w in weights]), persistent=False)
        self.reduction = reduction
        self.temperature = temperature
        self.freeze()

    @property
    def num_classes(self) -> int | None:
        return getattr(self.teachers[0], "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            each = [t(x) for t in self.teachers]
            if len({tuple(out.shape) for out in each}) > 1:  # torch.stack's error named no teacher
                shapes = ", ".join(f"teacher {i}: {tuple(out.shape)}" for i, out in enumerate(each))
                raise ValueError(f"The ensemble's teachers give logits of other shapes ({shapes}): each must give "
                                 f"one logit per class of the same classes")  # fmt: skip
            logits = torch.stack(each).float()  # (K, N, C)
            w = self.weights.view(-1, 1, 1)
            if self.reduction == "logits":
                return (w * logits).sum(0)
            t = self.temperature or 1.0
            log_w = torch.log(w.clamp_min(torch.finfo(logits.dtype).tiny))
            return t * torch.logsumexp(log_w + torch.log_softmax(logits / t, dim=-1), dim=0)

    def extra_repr(self) -> str:
        weights = [round(w, 4) for w in self.weights.tolist()]
        return f"reduction={self.reduction!r}, weights={weights}, temperature={self.temperature}"
