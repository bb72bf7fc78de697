"""KDLoss (Hinton 2015): golden values, a hand computation, limits and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from distill import DISTLoss, DKDLoss, KDLoss, LogitStandardKDLoss

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
        ({"temperature": 0.0}, "temperature must be a number > 0"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature must be a number > 0"),
        ({"temperature": float("nan")}, "temperature must be a number > 0"),
        ({"temperature": 1e200}, "whose square a float32 holds"),  # T^2 * KL was inf * 0: a NaN loss
        ({"temperature": 1e-30}, "whose square a float32 holds"),  # T^2 was 0 in float32: no soft term
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"temperature": "4"}, "temperature must be a number, got '4'"),  # were a TypeError from a comparison
        ({"alpha": None}, "alpha must be a number, got None"),
        ({"label_smoothing": True}, "label_smoothing must be a number, got True"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        KDLoss(**kwargs)


# ---- DKD, logit standardisation, DIST: each against its paper's formula in plain Python ----


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def mean_ce() -> float:
    return sum(-math.log(softmax(s)[y]) for s, y in zip(STUDENT, TARGET, strict=True)) / len(TARGET)


def dkd_by_hand(t: float) -> tuple[float, float]:
    """Zhao et al. 2022, eq. 1-5: b = [p_target, 1 - p_target]; p^ = softmax over the other classes."""
    tckd = nckd = 0.0
    for s, z, y in zip(STUDENT, TEACHER, TARGET, strict=True):
        p_s, p_t = softmax([v / t for v in s]), softmax([v / t for v in z])
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        rest = [i for i in range(len(s)) if i != y]
        nckd += kl(softmax([z[i] / t for i in rest]), softmax([s[i] / t for i in rest]))
    n = len(TARGET)
    return t * t * tckd / n, t * t * nckd / n


def test_dkd_matches_the_paper_and_sums_to_kd_at_the_classic_weights():
    t, alpha, beta = 4.0, 1.0, 8.0  # the paper's names of tckd_weight and nckd_weight
    terms = run(DKDLoss(t, tckd_weight=alpha, nckd_weight=beta, ce_weight=0.5))
    tckd, nckd = dkd_by_hand(t)
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * mean_ce() + alpha * tckd + beta * nckd, rel=1e-5)
    # KD = TCKD + (1 - p_target^T) NCKD (eq. 6): with beta = 1 - p_target^T per image, DKD is KD again
    for s, z, y in zip(STUDENT, TEACHER, TARGET, strict=True):
        one = DKDLoss(t, tckd_weight=1.0, nckd_weight=1 - softmax([v / t for v in z])[y], ce_weight=0.0)
        args = (torch.tensor([s]), torch.tensor([z]), torch.tensor([y]))
        assert one(*args)["loss"].item() == pytest.approx(KDLoss(t, 1.0)(*args)["kd"].item(), rel=1e-5)


def test_logit_standardisation_matches_the_paper_and_ignores_the_logits_scale():
    t = 2.0

    def zscore(v: list[float]) -> list[float]:
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
        return [(x - m) / (1e-7 + sd) for x in v]

    kd = (
        sum(
            kl(softmax([v / t for v in zscore(z)]), softmax([v / t for v in zscore(s)]))
            for s, z in zip(STUDENT, TEACHER, strict=True)
        )
        * t
        * t
        / len(TARGET)
    )
    terms = run(LogitStandardKDLoss(t, kd_weight=9.0, ce_weight=0.1))
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(9.0 * kd + 0.1 * mean_ce(), rel=1e-5)
    scaled = LogitStandardKDLoss(t)(3 * torch.tensor(STUDENT) + 5, torch.tensor(TEACHER), torch.tensor(TARGET))
    assert scaled["kd"].item() == pytest.approx(kd, rel=1e-4)  # an affine change of the logits changes nothing


def test_dist_matches_the_paper():
    t, beta, gamma = 4.0, 2.0, 2.0  # the paper's names of inter_weight and intra_weight

    def pearson(a: list[float], b: list[float]) -> float:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
        return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))

    student = [*STUDENT, [0.3, -2.0, 1.0], [2.5, 0.0, -0.5]]  # four images: a class's relation needs more than two
    teacher = [*TEACHER, [1.0, -1.0, 2.0], [3.0, 1.0, 1.5]]
    target = [*TARGET, 2, 0]
    y_s = [softmax([v / t for v in s]) for s in student]
    y_t = [softmax([v / t for v in z]) for z in teacher]
    inter = (1 - sum(pearson(a, b) for a, b in zip(y_s, y_t, strict=True)) / len(y_s)) * t * t
    columns = range(len(y_s[0]))
    intra = (1 - sum(pearson([r[c] for r in y_s], [r[c] for r in y_t]) for c in columns) / len(columns)) * t * t
    terms = DISTLoss(t, inter_weight=beta, intra_weight=gamma)(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(target)
    )
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(student, target, strict=True)) / len(target)
    assert intra > 0.01 and terms["inter"].item() == pytest.approx(inter, rel=1e-4)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(ce + beta * inter + gamma * intra, rel=1e-4)
    same = DISTLoss(t)(torch.tensor(TEACHER), torch.tensor(TEACHER), torch.tensor(TARGET))
    assert same["dist"].item() == pytest.approx(0.0, abs=1e-3)  # float32: 1 - rho to ~1e-6, times 4 T^2


@pytest.mark.parametrize("loss", [DKDLoss(), LogitStandardKDLoss(), DISTLoss()])
def test_every_loss_trains_on_labels_alone_and_sends_no_gradient_to_the_teacher(loss):
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    assert set(run(loss, teacher=None)) == {"loss", "ce"}
    loss(student, teacher, torch.tensor(TARGET))["loss"].backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DKDLoss(temperature=0), "temperature must be a number > 0"),
        (lambda: DKDLoss(nckd_weight=-1), r"loss weights must be finite and >= 0, got \{'nckd_weight': -1\}"),
        (lambda: LogitStandardKDLoss(kd_weight=math.inf), "kd_weight"),
        (lambda: DISTLoss(inter_weight=0, intra_weight=0, ce_weight=0), "every term's weight is 0 .*train nothing"),
        (lambda: DISTLoss(intra_weight=math.nan), "intra_weight"),
        (lambda: DKDLoss(warmup_epochs="20"), "warmup_epochs must be a number, got '20'"),
    ],
)
def test_new_losses_refuse_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_defaults_are_the_papers_and_dkd_ramps_in_over_its_warmup_epochs():
    dkd, ls, dist = DKDLoss(), LogitStandardKDLoss(), DISTLoss()
    assert (dkd.temperature, dkd.tckd_weight, dkd.nckd_weight, dkd.ce_weight, dkd.warmup_epochs) == (
        4.0,
        1.0,
        8.0,
        1.0,
        20.0,
    )
    assert (ls.temperature, ls.kd_weight, ls.ce_weight) == (2.0, 9.0, 0.1)
    assert (dist.temperature, dist.inter_weight, dist.intra_weight, dist.ce_weight) == (4.0, 2.0, 2.0, 1.0)
    full = run(dkd)  # used alone: at full strength
    assert full["loss"].item() == pytest.approx(mean_ce() + full["dkd"].item(), rel=1e-6)
    for epoch, weight in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        dkd.set_epoch(epoch)
        assert run(dkd)["loss"].item() == pytest.approx(mean_ce() + weight * full["dkd"].item(), rel=1e-6)
    dkd.set_epoch(0)
    assert run(dkd.eval())["loss"].item() == pytest.approx(full["loss"].item(), rel=1e-6)  # validation: the objective


def test_label_smoothing_mixes_the_uniform_distribution_into_the_labels():
    eps = 0.1
    by_hand = sum(
        (1 - eps) * -math.log(softmax(s)[y]) + eps * sum(-math.log(p) for p in softmax(s)) / len(s)
        for s, y in zip(STUDENT, TARGET, strict=True)
    ) / len(TARGET)
    alone = run(KDLoss(label_smoothing=eps), teacher=None)  # a teacher's training: CE alone
    assert alone["loss"].item() == pytest.approx(by_hand, rel=1e-5)
    kd = run(KDLoss(2.0, 0.7, label_smoothing=eps))
    assert kd["loss"].item() == pytest.approx(0.7 * kd["kd"].item() + 0.3 * by_hand, rel=1e-5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1"):
        KDLoss(label_smoothing=1)


@pytest.mark.parametrize("loss", [KDLoss(), DKDLoss(), LogitStandardKDLoss(), DISTLoss()])
def test_label_probabilities_as_targets_give_what_the_labels_give(loss):
    """Mixup hands the loss label probabilities: one-hot rows must give the integer labels' terms."""
    labels = run(loss)
    probabilities = loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.eye(3)[torch.tensor(TARGET)])
    for name, value in labels.items():
        assert probabilities[name].item() == pytest.approx(value.item(), rel=1e-6), name
