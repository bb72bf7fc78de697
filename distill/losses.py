"""Logit-based knowledge-distillation losses, each called ``loss(student_logits, teacher_logits, target)`` and
returning a dict of named terms whose ``loss`` is optimised (``teacher_logits=None``: cross-entropy alone).

- :class:`KDLoss`: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network". With student
  logits z_s, teacher logits z_t, labels y, temperature T and weight alpha::

      L_kd = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))      (mean over the batch)
      L    = alpha * L_kd + (1 - alpha) * CE(z_s, y)

  The T^2 factor keeps the soft term's gradient scale independent of T.
- :class:`DKDLoss`: Decoupled KD (Zhao et al., CVPR 2022): the KL split into the target class's binary part
  and the non-target classes' part, weighted apart.
- :class:`LogitStandardKDLoss`: KD on z-scored logits (Sun et al., CVPR 2024, "Logit Standardization in
  Knowledge Distillation"): the student matches the teacher's logit relations, not their scale.
- :class:`DISTLoss`: DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"):
  Pearson correlation of the probabilities between classes (per image) and between images (per class).

Each paper's defaults are the ones its authors' code uses on CIFAR-100. A weight is named after the term it
weighs (``tckd_weight``, ``inter_weight``, ...; KD's ``alpha`` is Hinton's), and a setting two losses share means
the same in both (``temperature``, ``ce_weight``): ``--model.loss`` given on the command line keeps the config's
settings that the new class has (jsonargparse), so none of them carries over into a weight of another term.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTLoss", "DKDLoss", "KDLoss", "LogitStandardKDLoss"]


class _DistillationLoss(nn.Module):
    """What every loss here shares: float32 logits, no gradient into the teacher's, cross-entropy alone
    without a teacher (with ``label_smoothing``, Szegedy et al. 2016); the distillation terms come from
    :meth:`terms`."""

    label_smoothing = 0.0

    @property
    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: what rebuilds this loss (``DistillModule`` records it in checkpoints)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {"class_path": f"distill.{type(self).__name__}", "init_args": {n: getattr(self, n) for n in names}}

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        student_logits = student_logits.float()
        ce = F.cross_entropy(student_logits, target, label_smoothing=self.label_smoothing)
        if teacher_logits is None:
            return {"loss": ce, "ce": ce}
        return self.terms(student_logits, teacher_logits.detach().float(), target, ce)

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The named terms, ``loss`` among them, from float32 logits and the cross-entropy ``ce``."""
        raise NotImplementedError


class KDLoss(_DistillationLoss):
    """Soft-label KL at temperature T mixed with hard-label cross-entropy.

    Called as ``loss(student_logits, teacher_logits, target)``, it returns a dict of named terms:
    ``loss`` (what is optimised), ``kd`` (T^2 * KL, before the alpha weight) and ``ce``. With
    ``teacher_logits=None`` (no teacher: plain supervised training) ``loss`` is the cross-entropy.
    The teacher's logits are targets: no gradient flows into them, even from a teacher that is not frozen.

    Args:
        temperature: T > 0; larger T gives softer targets (common: 4; seed 004's homework: 20).
        alpha: weight of the soft term, in [0, 1] (common: 0.9; seed 004's homework: 0.5).
        label_smoothing: the cross-entropy's target mixes in this much of the uniform distribution
            (Szegedy et al., CVPR 2016): for training teachers (``alpha`` plays no part without one);
            0.1 is the usual value.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0) -> None:
        super().__init__()
        _check_numbers(alpha=alpha, label_smoothing=label_smoothing)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.temperature = _check_temperature(temperature)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * ce, "kd": kd, "ce": ce}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"


def _check_numbers(**values: Any) -> None:
    """Each value a real number (not a bool, a string or None): a comparison with a string raised a TypeError."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")


def _check_temperature(temperature: float) -> float:
    """T > 0 whose square (the soft terms' factor) is a normal float32: past it the loss is NaN or 0."""
    _check_numbers(temperature=temperature)
    f32 = torch.finfo(torch.float32)
    if not (0 < temperature < math.inf and f32.tiny <= temperature * temperature <= f32.max):
        raise ValueError(f"temperature must be a number > 0 whose square a float32 holds (about 1e-19 to 1e19), got "
                         f"{temperature}")  # fmt: skip
    return float(temperature)


def _check_weights(**weights: float) -> None:
    """Each weight finite and >= 0, and one of the terms' weights (all but ``warmup_epochs``) above 0."""
    _check_numbers(**weights)
    bad = {k: v for k, v in weights.items() if not 0 <= v < math.inf}
    if bad:
        raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
    terms = {k: v for k, v in weights.items() if k.endswith("_weight")}
    if terms and not any(terms.values()):
        raise ValueError(f"every term's weight is 0 ({', '.join(terms)}): the loss would be 0 and train nothing")


def _kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(p_teacher || p_student), from log-probabilities."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class DKDLoss(_DistillationLoss):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    With p = softmax(z / T): TCKD is the KL between the teacher's and the student's binary distributions
    [p_target, 1 - p_target]; NCKD the KL between their distributions over the non-target classes
    (softmax of z / T with the target left out). ``dkd = T^2 * (tckd_weight * TCKD + nckd_weight * NCKD)`` and
    ``loss = ce_weight * CE + min((epoch + 1) / warmup_epochs, 1) * dkd``, the ramp of the authors' code
    (mdistiller; ``DistillModule`` tells the loss its epoch; used alone, the term is at full strength). The ramp
    is of training only: in eval mode (validation, test) the term is at full strength, so ``val/loss`` is the same
    objective at every epoch and in every process (a checkpoint validated in a fresh process read 1.0 where the
    fit's own validation had read its epoch's ramp).
    Terms ``loss``, ``dkd``, ``tckd``, ``nckd`` (both times T^2), ``ce``. With label probabilities as the
    target (mixup), the target class is the most probable one.

    Args:
        temperature: T > 0.
        tckd_weight: weight of TCKD (the paper's alpha: 1.0 there and in mdistiller).
        nckd_weight: weight of NCKD (the paper's beta): 8.0 is mdistiller's CIFAR-100 default (ResNet32x4
            teacher); its other CIFAR-100 pairs use 6 or 2, ImageNet 0.5 with T = 1.
        ce_weight: weight of the cross-entropy with the labels.
        warmup_epochs: epochs over which the DKD term ramps in linearly (mdistiller's 20; 0: none).
    """

    def __init__(
        self,
        temperature: float = 4.0,
        tckd_weight: float = 1.0,
        nckd_weight: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: float = 20.0,
    ) -> None:
        super().__init__()
        _check_weights(
            tckd_weight=tckd_weight, nckd_weight=nckd_weight, ce_weight=ce_weight, warmup_epochs=warmup_epochs
        )
        self.temperature = _check_temperature(temperature)
        self.tckd_weight, self.nckd_weight = float(tckd_weight), float(nckd_weight)
        self.ce_weight = float(ce_weight)
        self.warmup_epochs = float(warmup_epochs)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """The 0-based training epoch, for the ramp."""
        self.epoch = epoch

    @property
    def ramp(self) -> float:
        """The DKD term's weight now: ``min((epoch + 1) / warmup_epochs, 1)`` in training, else 1."""
        if not self.training or self.epoch is None or self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        t = self.temperature
        label = target.argmax(-1) if target.is_floating_point() else target  # mixup's label probabilities
        is_target = F.one_hot(label, student_logits.shape[-1]).bool()
        s, z = student_logits / t, teacher_logits / t

        def binary(logits: torch.Tensor) -> torch.Tensor:  # log [p_target, 1 - p_target]
            log_p = F.log_softmax(logits, dim=-1)
            log_target = log_p.gather(-1, label.unsqueeze(-1)).squeeze(-1)  # not log_p[is_target]: a GPU sync
            log_rest = torch.logsumexp(log_p.masked_fill(is_target, -math.inf), dim=-1)
            return torch.stack([log_target, log_rest], dim=-1)

        def others(logits: torch.Tensor) -> torch.Tensor:  # log softmax over the non-target classes
            return F.log_softmax(logits.masked_fill(is_target, -math.inf), dim=-1).masked_fill(is_target, 0.0)

        tckd = _kl(binary(z), binary(s)) * t * t
        log_zt, log_zs = others(z), others(s)
        nckd = (log_zt.exp() * (log_zt - log_zs)).sum(-1).mean() * t * t
        dkd = self.tckd_weight * tckd + self.nckd_weight * nckd
        return {"loss": self.ce_weight * ce + self.ramp * dkd, "dkd": dkd, "tckd": tckd, "nckd": nckd, "ce": ce}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, tckd_weight={self.tckd_weight}, nckd_weight={self.nckd_weight}, "
            f"ce_weight={self.ce_weight}, "
            f"warmup_epochs={self.warmup_epochs}"
        )


class LogitStandardKDLoss(_DistillationLoss):
    """KD on z-score standardised logits (Sun et al., CVPR 2024, "Logit Standardization in KD").

    Each image's logits become (z - mean(z)) / (1e-7 + std(z)) (std with Bessel's correction, as the
    authors' code; the paper's formula has the population std) before the softmax at temperature T, so a
    small student need not match a large teacher's logit range.
    ``loss = ce_weight * CE + kd_weight * T^2 * KL(softmax(std(z_t) / T) || softmax(std(z_s) / T))``;
    terms ``loss``, ``kd`` (before ``kd_weight``), ``ce``. As in the authors' code, a row of (nearly)
    constant logits gets gradients of order 1e7. A ``TeacherEnsemble(reduction="probs")`` averages its
    members' probabilities at this T before the standardisation, not their standardised distributions.

    Args:
        temperature: T > 0: 2, the authors' most common CIFAR-100 setting with standardisation (some
            pairs use 3).
        kd_weight: weight of the KD term (the authors' 9 with standardisation).
        ce_weight: weight of the cross-entropy (0.1, mdistiller's default the authors build on).
    """

    def __init__(self, temperature: float = 2.0, kd_weight: float = 9.0, ce_weight: float = 0.1):
        super().__init__()
        _check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        self.temperature = _check_temperature(temperature)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)

    @staticmethod
    def standardize(logits: torch.Tensor) -> torch.Tensor:
        """Each row's z-score (the 1e-7 keeps constant logits finite, as in the authors' code)."""
        return (logits - logits.mean(-1, keepdim=True)) / (1e-7 + logits.std(-1, keepdim=True))

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        t = self.temperature
        log_pt = F.log_softmax(self.standardize(teacher_logits) / t, dim=-1)
        log_ps = F.log_softmax(self.standardize(student_logits) / t, dim=-1)
        kd = _kl(log_pt, log_ps) * t * t
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "kd": kd, "ce": ce}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}"


class DISTLoss(_DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

    With Y = softmax(z / T) for the batch (images x classes) and rho the Pearson correlation:
    inter = 1 - mean over images of rho(Y_s[i, :], Y_t[i, :]) (the classes' ranking in each image), intra =
    1 - mean over classes of rho(Y_s[:, c], Y_t[:, c]) (the images' ranking in each class).
    ``loss = ce_weight * CE + T^2 * (inter_weight * inter + intra_weight * intra)``; terms ``loss``, ``dist``,
    ``inter``, ``intra`` (both times T^2), ``ce``. Matching relations, not values, tolerates a teacher much stronger
    than the student. The intra relation is over the images of one (device) batch: with fewer than 3 it
    says little (with 1 it is a constant T^2, with no gradient).

    Args:
        temperature: T > 0 (the paper's CIFAR-100 setting 4; its released ImageNet code uses 1).
        inter_weight: weight of the inter-class relation (the paper's beta: 2 on CIFAR-100, 1 on ImageNet).
        intra_weight: weight of the intra-class relation (the paper's gamma: 2 on CIFAR-100, 1 on ImageNet).
        ce_weight: weight of the cross-entropy.
    """

    def __init__(
        self, temperature: float = 4.0, inter_weight: float = 2.0, intra_weight: float = 2.0, ce_weight: float = 1.0
    ) -> None:
        super().__init__()
        _check_weights(inter_weight=inter_weight, intra_weight=intra_weight, ce_weight=ce_weight)
        self.temperature = _check_temperature(temperature)
        self.inter_weight, self.intra_weight = float(inter_weight), float(intra_weight)
        self.ce_weight = float(ce_weight)

    @staticmethod
    def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """Row-wise Pearson correlation (the authors' eps in the cosine's denominator)."""
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        t = self.temperature
        y_s = F.softmax(student_logits / t, dim=-1)
        y_t = F.softmax(teacher_logits / t, dim=-1)
        inter = (1 - self.pearson(y_s, y_t).mean()) * t * t
        intra = (1 - self.pearson(y_s.T, y_t.T).mean()) * t * t
        dist = self.inter_weight * inter + self.intra_weight * intra
        return {"loss": self.ce_weight * ce + dist, "dist": dist, "inter": inter, "intra": intra, "ce": ce}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, inter_weight={self.inter_weight}, intra_weight={self.intra_weight}, "
            f"ce_weight={self.ce_weight}"
        )
