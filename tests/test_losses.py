"""KDLoss (Hinton 2015): golden values, a hand computation, limits and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from distill import KDLoss

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
TARGET = [1, 2]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def by_hand(temperature: float, alpha: float) -> tuple[float, float, float]:
    """alpha * T^2 * mean KL(p_t || p_s) + (1 - alpha) * mean CE, in plain Python."""
    kl = ce = 0.0
    for s, t, y in zip(STUDENT, TEACHER, TARGET, strict=True):
        p_t = softmax([v / temperature for v in t])
        p_s = softmax([v / temperature for v in s])
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_t, p_s, strict=True))
        ce += -math.log(softmax(s)[y])
    kd = temperature**2 * kl / len(TARGET)
    ce /= len(TARGET)
    return alpha * kd + (1 - alpha) * ce, kd, ce


def run(loss: KDLoss, teacher: list | None = TEACHER) -> dict[str, torch.Tensor]:
    t = None if teacher is None else torch.tensor(teacher)
    return loss(torch.tensor(STUDENT), t, torch.tensor(TARGET))


def test_golden_value():
    terms = run(KDLoss(temperature=2.0, alpha=0.7))
    assert set(terms) == {"loss", "kd", "ce"}
    assert terms["loss"].item() == pytest.approx(0.40384903116223936, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.46330161140347603, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.26512634393268697, abs=1e-6)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (20.0, 0.5), (3.0, 0.0), (3.0, 1.0)])
def test_matches_the_formula_by_hand(temperature: float, alpha: float):
    terms = run(KDLoss(temperature, alpha))
    loss, kd, ce = by_hand(temperature, alpha)
    assert terms["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_identical_logits_give_zero_kd():
    terms = KDLoss(4.0, 1.0)(torch.tensor(STUDENT), torch.tensor(STUDENT), torch.tensor(TARGET))
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_no_teacher_is_cross_entropy():
    terms = run(KDLoss(4.0, 0.9), teacher=None)
    assert set(terms) == {"loss", "ce"}
    assert terms["loss"].item() == pytest.approx(by_hand(4.0, 0.0)[2], rel=1e-6)


def test_gradient_reaches_the_student_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)  # the logits of a teacher that is not frozen
    KDLoss(alpha=0.9)(student, teacher, torch.tensor(TARGET))["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # targets: KL's gradient with respect to them is not zero, but never flows


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        KDLoss(**kwargs)
