"""Knowledge-distillation loss (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network").

With student logits z_s, teacher logits z_t, labels y, temperature T and weight alpha:

    L_kd = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))      (mean over the batch)
    L    = alpha * L_kd + (1 - alpha) * CE(z_s, y)

The T^2 factor keeps the soft term's gradient scale independent of T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Soft-label KL at temperature T mixed with hard-label cross-entropy.

    Called as ``loss(student_logits, teacher_logits, target)``, it returns a dict of named terms:
    ``loss`` (what is optimised), ``kd`` (T^2 * KL, before the alpha weight) and ``ce``. With
    ``teacher_logits=None`` (no teacher: plain supervised training) ``loss`` is the cross-entropy.
    The teacher's logits are targets: no gradient flows into them, even from a teacher that is not frozen.

    Args:
        temperature: T > 0; larger T gives softer targets (common: 4; seed 004's homework: 20).
        alpha: weight of the soft term, in [0, 1] (common: 0.9; seed 004's homework: 0.5).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        student_logits = student_logits.float()
        ce = F.cross_entropy(student_logits, target)
        if teacher_logits is None:
            return {"loss": ce, "ce": ce}
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits.detach().float() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * ce, "kd": kd, "ce": ce}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
