"""Physical channel pruning: equivalence, shapes, criteria, options, callbacks and bad input."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fmnist, tiny_trainer
from pytorch_lightning import Callback
from torch import nn

from distill import DistillModule
from distill.optim import lr_factor
from distill.profile import check_runs_on, count_params
from distill.pruning import (
    ChannelPruning,
    GroupLasso,
    HRankImportance,
    NetworkSlimming,
    PruningPolicy,
    PruningSchedule,
    TaylorImportance,
    channel_counts,
    channel_groups,
    prune_student,
    resolve_importance,
)
from students import StudentNet, create_student
from teachers import load_teacher

ROOT = Path(__file__).parents[1]
X1 = torch.zeros(1, 1, 28, 28)
STUDENTS = [
    ("test_studentnet", {"num_pools": 3}),
    ("timm/test_resnet", {"small_input": True}),  # residual additions
    ("timm/mobilenetv3_small_050", {}),  # depthwise convs, squeeze-excite
]


def build(name: str = "studentnet", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = {"num_classes": 10, "in_chans": 1, **kwargs}
    if name.endswith("studentnet") and "num_pools" not in options:
        options["num_pools"] = 3
    return create_student(name, **options).eval()


def randomise_batchnorm_statistics(model: nn.Module) -> None:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)


def batches(n: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator))] * n


def test_removing_zero_gamma_channels_keeps_outputs_exactly():
    model = build("studentnet")
    randomise_batchnorm_statistics(model)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    zeroed: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, group in channel_groups(model, X1).items():
            norms = [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.BatchNorm2d)]
            if not norms:  # the last layer feeds the classifier: no BatchNorm to zero
                continue
            n = len(group[0][1])
            chosen = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: n // 4].tolist()
            for bn in norms:
                bn.weight[chosen] = 0.0
                bn.bias[chosen] = 0.0
            zeroed[name] = sorted(chosen)
    expected = model(x)
    widths_before = model.channels

    report = prune_student(model, X1, PruningPolicy("bn_scale", round_to=1), ratio=0.25)  # exact counts

    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    assert len(zeroed) == 7
    widths_after = [w - w // 4 for w in widths_before[:7]] + [widths_before[7]]
    assert model.channels == widths_after
    assert report.params_after == count_params(StudentNet(channels=widths_after, num_classes=10, in_chans=1))
    assert report.params_before - report.params_after > 0
    assert {name: report.channels_before[name] - report.channels_after[name] for name in zeroed} == {
        name: len(idx) for name, idx in zeroed.items()
    }


@pytest.mark.parametrize(("name", "kwargs"), STUDENTS, ids=[s[0] for s in STUDENTS])
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "hrank", "random"])
def test_every_criterion_shrinks_every_student(name: str, kwargs: dict, criterion: str):
    model = build(name, **kwargs)
    convs_before = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = prune_student(model, X1, PruningPolicy(criterion), ratio=0.5, data=batches())
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.params_after == count_params(model)
    shrunk = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels < convs_before[n][1]]
    assert shrunk, "no conv lost channels"
    for module in model.modules():  # every layer is consistent with its tensors
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[0] == module.out_channels
            assert module.weight.shape[1] * module.groups == module.in_channels
        if isinstance(module, nn.BatchNorm2d):
            assert module.weight.shape[0] == module.running_mean.shape[0] == module.num_features
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1  # the image channels are never pruned
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)  # neither are the classes


def test_pruning_keeps_each_layer_in_its_mode():
    model = build("timm/test_resnet", small_input=True).train()
    model.layer1.eval()  # e.g. a frozen stage
    modes = {name: m.training for name, m in model.named_modules()}
    prune_student(model, X1, PruningPolicy("l1"), ratio=0.5)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_per_layer_ratio_floor_and_round_to():
    model = build("studentnet")
    before = model.channels
    prune_student(model, X1, PruningPolicy("l1", round_to=8), ratio=0.3)
    assert model.channels == [min(w, math.ceil(math.ceil(w * 0.7) / 8) * 8) for w in before]
    model = build("studentnet")
    prune_student(model, X1, PruningPolicy("l1", min_channels=12, min_fraction=0.25, round_to=1), ratio=0.9)
    assert model.channels == [max(12, math.ceil(w * 0.25), math.ceil(w * 0.1)) for w in before]
    model = build("studentnet")  # the default rounds the floors up too: 12 -> 16, 32 -> 32, 64 -> 64
    prune_student(model, X1, PruningPolicy("l1", min_channels=12, min_fraction=0.25), ratio=0.9)
    assert model.channels == [math.ceil(max(12, math.ceil(w * 0.25)) / 8) * 8 for w in before]


def test_global_ranking_respects_floors():
    model = build("studentnet")
    with torch.no_grad():  # tiny |gamma| after the first two layers: one global threshold would empty them
        for bn in ("cnn.0.1", "cnn.1.1", "cnn.2.1"):
            model.get_submodule(bn).weight.mul_(1e-6)
    policy = PruningPolicy("bn_scale", global_ranking=True, min_channels=2, round_to=1)
    report = prune_student(model, X1, policy, ratio=0.5)
    assert report.channels_after["cnn.0.0"] == 2 and report.channels_after["cnn.1.3"] == 2
    scored = [name for name in report.channels_before if name != "cnn.7.3"]  # cnn.7.3 has no BatchNorm
    assert sum(report.channels_after[n] for n in scored) == sum(report.channels_before[n] for n in scored) // 2
    assert report.channels_after["cnn.7.3"] == 256


@pytest.mark.parametrize("target", ["target_params", "target_macs"])
def test_targets_are_met_from_below(target: str):
    model = build("studentnet")
    full = count_params(model) if target == "target_params" else prune_student(build(), X1, ratio=0.0).macs_before
    report = prune_student(model, X1, PruningPolicy("l1"), **{target: full // 3})
    reached = report.params_after if target == "target_params" else report.macs_after
    assert full // 4 < reached <= full // 3


def test_ignored_layers_keep_their_channels():
    model = build("studentnet")
    prune_student(model, X1, PruningPolicy("l1", ignored_layers=["cnn.0.0", "cnn.7.3"]), ratio=0.5)
    assert model.channels[0] == 16 and model.channels[7] == 256 and model.channels[3] == 64


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "hrank"])
def test_criteria_score_a_dead_channel_lowest(criterion: str):
    model = build("studentnet")
    with torch.no_grad():  # channel 5 of cnn.3.3's output is dead: zero filter and bias
        model.cnn[3][3].weight[5] = 0.0
        model.cnn[3][3].bias[5] = 0.0
    importance = resolve_importance(criterion)
    if hasattr(importance, "collect"):
        importance.collect(model, batches())
    scores = importance(channel_groups(model, X1)["cnn.3.3"])
    assert scores.shape == (128,)
    assert scores[5] == scores.min() == 0.0
    if criterion in ("l1", "l2", "hrank"):  # the others are strictly positive here
        assert (scores[torch.arange(128) != 5] > 0).all()
        policy = PruningPolicy(criterion, ignored_layers=["cnn.0.0"], round_to=1)
        prune_student(model, X1, policy, ratio=1 / 128, data=batches())
        assert model.channels[3] == 127
        assert (model.cnn[3][3].weight.flatten(1).abs().sum(1) > 0).all()  # the dead filter is the one gone


def test_hrank_scores_are_mean_feature_map_ranks():
    model = build("studentnet", num_pools=2)
    hrank = HRankImportance(num_batches=1, max_images=4)
    hrank.collect(model, batches(1))
    scores = hrank.scores[model.cnn[3][3]]
    assert scores.shape == (128,) and scores.max() <= 7 and scores.min() >= 0  # 7x7 maps


def test_l1_is_torch_prunings_magnitude_only_where_the_groups_root_produces_the_channels():
    """Why ``l1`` is ours: torch-pruning's scores the layer a group lists first, in StudentNet a depthwise conv."""
    import torch_pruning as tp

    theirs = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer="mean")
    ours = resolve_importance("l1")
    for name, agrees in (("timm/test_resnet", True), ("studentnet", False)):
        groups = channel_groups(build(name), X1).values()
        assert all(torch.allclose(ours(group), theirs(group), rtol=1e-5) for group in groups) == agrees


def test_the_policy_gives_data_driven_criteria_its_batch_count_and_floors_of_the_starting_channels():
    pruner = ChannelPruning("taylor", PruningSchedule(ratio=0.1), num_batches=7)  # its num_batches was lost
    assert pruner.policy.criterion().num_batches == 7
    policy = PruningPolicy(min_channels=3, min_fraction=0.25)
    assert policy.floors({"a": 64, "b": 8}) == {"a": 16, "b": 3}
    model = build("studentnet")
    start = channel_counts(model, X1)
    prune_student(model, X1, policy, ratio=0.5)
    prune_student(model, X1, policy, ratio=0.9, floors=policy.floors(start))  # of the channels before step 1
    assert model.channels[1:] == [max(3, math.ceil(0.25 * c)) for c in StudentNet(num_pools=3).channels[1:]]


def test_random_is_reproducible():
    a, b = build("studentnet"), build("studentnet")
    prune_student(a, X1, PruningPolicy("random"), ratio=0.5)
    prune_student(b, X1, PruningPolicy("random"), ratio=0.5)
    assert torch.equal(a.cnn[2][3].weight, b.cnn[2][3].weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"target_params": 10**9}, "below the student's current"),
        ({"importance": "magnitude", "ratio": 0.5}, r"Unknown importance criterion 'magnitude'.*l1, l2, bn_scale"),
        ({"importance": "taylor", "ratio": 0.5}, "data-driven: pass data="),
        ({"importance": "hrank", "ratio": 0.5}, "data-driven: pass data="),
        ({"target_params": 20_000, "min_fraction": 0.5}, "cannot be met without emptying a layer"),
        ({"ratio": 0.5, "target_params": 1000}, "exactly one of"),
        ({"ratio": 0.5, "ignored_layers": ["cnn.99"]}, "ignored_layers names no layer"),
        ({"ratio": 0.5, "ignored_layers": "cnn.0.0"}, r"ignored_layers is a list of layer names: give \['cnn.0.0'\]"),
        ({"ratio": 0.5, "global_ranking": "false"}, "global_ranking must be True or False, got 'false'"),
        ({"ratio": 0.5, "ignore_unprunable": 1}, "ignore_unprunable must be True or False, got 1"),
        ({"ratio": 0.5, "round_to": 8.0}, "round_to must be a whole number, got 8.0"),
        ({"ratio": 0.5, "min_channels": True}, "min_channels must be a whole number, got True"),
        (
            {"ratio": 0.5, "importance": lambda _group: torch.ones(3)},  # pruned nothing: the floors were of 3 channels
            r"importance <lambda> gave a tensor of shape \(3,\) for 'cnn\.\d\.\d', a group of \d+ channels: it must",
        ),
    ],
)
def test_bad_input(kwargs: dict, match: str):
    policy_keys = ("importance", "min_fraction", "ignored_layers", "global_ranking", "ignore_unprunable", "round_to",
                   "min_channels")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        policy = PruningPolicy(**{k: v for k, v in kwargs.items() if k in policy_keys})
        prune_student(build("studentnet"), X1, policy, **{k: v for k, v in kwargs.items() if k not in policy_keys})


def test_an_example_input_the_student_does_not_run_on_is_named_not_blamed_on_the_architecture():
    for x, why, fix in (
        (torch.zeros(1, 3, 28, 28), r"RuntimeError: .* to have 1 channels", r"give one shaped as its data, \(1, "),
        (torch.zeros(1, 28, 28), "ValueError: expected 4D", r"give one shaped as its data, \(1, "),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "RuntimeError: ", r"give it as torch\.float32 on cpu, as the"),
        (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), "RuntimeError: ", r"give one shaped as its data"),  # both
    ):
        with pytest.raises(ValueError, match=rf"StudentNet does not run on the example input .*\({why}.*: {fix}"):
            prune_student(build("studentnet"), x, ratio=0.5)  # was: "torch-pruning cannot trace StudentNet"
    with pytest.raises(ValueError, match=r"\): give it as torch\.float32 on meta, as the model's weights are$"):
        check_runs_on(build("studentnet").to("meta"), X1)  # another device (a GPU's, where there is one)


def test_a_module_holding_the_student_is_refused_and_left_unchanged():
    """Pruned whole, a DistillModule's timm student kept the spec of its unpruned layout: training and saving
    went on, and its checkpoints no longer loaded."""
    module = DistillModule(build("timm/test_resnet"))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"DistillModule holds the student to prune: prune that module, prune_studen"):
        prune_student(module, X1, ratio=0.3)
    assert (
        all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
        and module.state_dict().keys() == before.keys()
    )
    wrapper = nn.Sequential(nn.Identity(), build("timm/test_resnet"))  # a student of the user's own: pruned
    assert prune_student(wrapper, X1, ratio=0.3).params_after < count_params(build("timm/test_resnet"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.1, "final_ratio": 0.5}, "needs one of"),
        ({}, "needs one of"),
        ({"final_ratio": 1.5}, r"final_ratio must be in \[0, 1\)"),
        ({"ratio": 0.1, "steps": 0}, "steps >= 1"),
    ],
)
def test_bad_schedules(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PruningSchedule(**kwargs)
    with pytest.raises(ValueError, match="Unknown importance criterion"):
        ChannelPruning("weights", PruningSchedule(ratio=0.1))
    with pytest.raises(ValueError, match="needs a schedule"):
        ChannelPruning("l1")


def test_schedule_steps():
    schedule = PruningSchedule(start_epoch=2, every=3, steps=3, final_ratio=0.488)
    assert schedule.epochs() == [2, 5, 8]
    assert schedule.step_at(3, 1000, 10) is None
    assert schedule.step_at(5, 1000, 10).ratio == pytest.approx(0.2)  # 0.8 ** 3 = 0.512 kept
    targets = PruningSchedule(steps=2, target_params=250)
    assert targets.step_at(0, 1000, 10).target_params == 500 and targets.step_at(1, 1000, 10).target_params == 250


def _fit_with_pruning(tmp_path: Path, name: str, kwargs: dict, teacher_checkpoint: Path, **pruning) -> tuple:
    student = build(name, **kwargs).train()
    initial_parameters = list(student.parameters())  # references keep their ids unique
    teacher = load_teacher(checkpoint=teacher_checkpoint)
    model = DistillModule(student, teacher, optimizer="sgd", lr=0.05)
    pruner = ChannelPruning(schedule=PruningSchedule(start_epoch=0, every=1, steps=2, final_ratio=0.5), **pruning)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[pruner])
    trainer.fit(model, datamodule=fmnist())
    return model, teacher, trainer, pruner, initial_parameters


@pytest.mark.parametrize(("name", "kwargs"), STUDENTS[:2], ids=[s[0] for s in STUDENTS[:2]])
def test_channel_pruning_during_training(tmp_path: Path, teacher_checkpoint: Path, name: str, kwargs: dict):
    teacher_before = {k: v.clone() for k, v in load_teacher(checkpoint=teacher_checkpoint).state_dict().items()}
    model, teacher, trainer, pruner, initial = _fit_with_pruning(
        tmp_path, name, kwargs, teacher_checkpoint, importance="taylor"
    )

    assert len(pruner.reports) == 2
    assert pruner.reports[-1].params_after < pruner.reports[0].params_before
    assert count_params(model.student) == pruner.reports[-1].params_after
    # training went on: a third epoch after the second prune, with an optimizer over exactly the new parameters
    assert trainer.global_step == 9
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    current = {id(p) for p in model.student.parameters()}
    replaced = {id(p) for p in initial} - current
    assert optimized == current
    assert replaced and not optimized & replaced
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.05 * lr_factor(9, 9))  # the schedule continued where it was
    assert "prune/params" in trainer.callback_metrics
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"

    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from students import load_student; from distill import DistillModule\n"
        "x = torch.load(sys.argv[2])\n"
        "torch.save(torch.stack([load_student(sys.argv[1])(x), "
        "DistillModule.load_from_checkpoint(sys.argv[1]).eval()(x)]), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True, cwd=ROOT
    )
    expected = model.student.eval()(x)
    outputs = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=0)


def test_pruning_callbacks_refuse_what_they_cannot_do_before_a_python_fit_trains(tmp_path: Path):
    """From Python (no ``distill fit`` to check first), a target out of reach failed after an epoch of training, a
    target above the student pruned nothing, a schedule past the fit's end stopped short of its target in silence,
    and NetworkSlimming without BatchNorm trained an epoch, then failed."""

    trained = []  # each fit's optimizer steps, refused or not

    def fit(callback: Callback, student: nn.Module | None = None, max_epochs: int = 1) -> None:
        trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, limit_val_batches=0, callbacks=[callback])
        try:
            trainer.fit(DistillModule(student or build("test_studentnet"), lr=0.05), datamodule=fmnist())
        finally:
            trained.append(trainer.global_step)

    for target, match in (
        (10, "cannot be met"),
        (10**7, "target_params=10,000,000 must be below the student.s current"),
    ):
        with pytest.raises(ValueError, match=match):
            fit(ChannelPruning(schedule=PruningSchedule(target_params=target)))
    late = PruningSchedule(target_params=1500, steps=3, start_epoch=1)
    with pytest.warns(UserWarning, match=r"at the end of epochs \[1, 2, 3\], but the fit ends after epoch 1 "
                                         r"\(max_epochs=2\): 2 of its 3 steps will not run"):  # fmt: skip
        fit(ChannelPruning(schedule=late), max_epochs=2)
    with pytest.raises(ValueError, match=r"NetworkSlimming acts on BatchNorm scales, and the student \(EfficientNet\)"):
        fit(NetworkSlimming(), build("timm/test_efficientnet_gn"))
    with pytest.raises(
        ValueError, match=r"GroupLasso acts on 2-d convolutions, and the student \(Sequential\) has none"
    ):
        fit(GroupLasso(), nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(ValueError, match=r"schedule gave -0.2 for epoch 0: give a ratio in \[0, 1\)"):  # AttributeError
        fit(ChannelPruning(schedule=lambda _epoch: -0.2))
    assert trained == [0, 0, 6, 0, 0, 3]


def test_resume_after_pruning_continues_the_pruned_run(tmp_path: Path, teacher_checkpoint: Path):
    model, _, trainer, _, _ = _fit_with_pruning(tmp_path, "test_studentnet", {"num_pools": 3}, teacher_checkpoint)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    fresh = DistillModule(
        build("test_studentnet").train(), load_teacher(checkpoint=teacher_checkpoint), optimizer="sgd", lr=0.05
    )
    pruner = ChannelPruning(schedule=PruningSchedule(start_epoch=0, every=1, steps=2, final_ratio=0.5))
    resumed = tiny_trainer(tmp_path, max_epochs=4, callbacks=[pruner])
    resumed.fit(fresh, datamodule=fmnist(), ckpt_path=tmp_path / "after.ckpt")
    assert fresh.student.channels == model.student.channels  # no third prune, the layout came back
    assert resumed.global_step == 12 and not pruner.reports


def test_a_pruned_module_still_evaluates_a_checkpoint_from_before_pruning(tmp_path: Path, teacher_checkpoint: Path):
    model, _, trainer, _, _ = _fit_with_pruning(tmp_path, "test_studentnet", {"num_pools": 3}, teacher_checkpoint)
    wide = DistillModule(
        build("test_studentnet"), load_teacher(checkpoint=teacher_checkpoint), optimizer="sgd", lr=0.05
    )
    tiny_trainer(tmp_path / "wide", limit_train_batches=1).fit(wide, datamodule=fmnist())
    wide.trainer.save_checkpoint(tmp_path / "wide.ckpt")
    pruned = list(model.student.channels)
    trainer.test(model, datamodule=fmnist(), ckpt_path=tmp_path / "wide.ckpt", verbose=False)
    assert model.student.channels == wide.student.channels != pruned  # the run's own architecture, not refused
    with pytest.raises(ValueError, match="holds the student timm/test_resnet"):  # a Lightning checkpoint of a ResNet
        trainer.test(model, datamodule=fmnist(), ckpt_path=teacher_checkpoint, verbose=False)


def _one_sgd_step(tmp_path: Path, callbacks: list, start: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """One plain SGD step (no momentum, no weight decay) from the same weights on the same batch."""
    student = copy.deepcopy(start if start is not None else build("studentnet")).train()
    model = DistillModule(student, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, datamodule=fmnist())
    return model.student, trainer.callback_metrics


def test_network_slimming_adds_the_l1_subgradient(tmp_path: Path):
    start = build("studentnet")
    with torch.no_grad():
        start.cnn[2][1].weight[:5] = 0.0  # sign(0) = 0: these get no push
    plain, _ = _one_sgd_step(tmp_path, [], start)
    slim, logged = _one_sgd_step(tmp_path, [NetworkSlimming(lambda_=1e-2, threshold=0.5)], start)
    gammas = [NetworkSlimming.gammas(m) for m in (start, plain, slim)]
    for g0, gp, gs in zip(*gammas, strict=True):
        torch.testing.assert_close(gs - gp, -0.1 * 1e-2 * torch.sign(g0), atol=1e-6, rtol=0)
    final = torch.cat([g.detach().abs() for g in gammas[2]])
    assert logged["slimming/near_zero"] == (final < 0.5).sum() and logged["slimming/gamma_l1"] == pytest.approx(
        final.sum().item(), rel=1e-5
    )


def test_group_lasso_adds_the_filter_norm_gradient(tmp_path: Path):
    start = build("studentnet")
    plain, _ = _one_sgd_step(tmp_path, [], start)
    lasso, logged = _one_sgd_step(tmp_path, [GroupLasso(lambda_filter=1e-2)], start)
    for c0, cp, cl in zip(GroupLasso.convs(start), GroupLasso.convs(plain), GroupLasso.convs(lasso), strict=True):
        w = c0.weight
        expected = -0.1 * 1e-2 * w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(cl.weight - cp.weight, expected, atol=1e-6, rtol=0)
    assert "group_lasso/filter_norm" in logged


def test_a_checked_pruner_still_pickles_and_deep_copies():
    """ddp_spawn pickles the callbacks; a pruner keeps the student it checked by a weak reference, which does not."""
    pruner = ChannelPruning(schedule=PruningSchedule(target_params=1500))
    pruner.check(build("test_studentnet"), X1)
    gc.collect()
    assert pruner._checked() is None  # gone with its student: a new one at its address is checked (an id was not)
    for copied in (pickle.loads(pickle.dumps(pruner)), copy.deepcopy(pruner)):
        assert copied.schedule == pruner.schedule and copied.policy == pruner.policy


def test_regularizer_arguments_are_checked():
    with pytest.raises(ValueError, match="lambda_ and threshold"):
        NetworkSlimming(lambda_=-1)
    with pytest.raises(ValueError, match="lambda_ and threshold must be finite"):
        NetworkSlimming(threshold=float("nan"))
    with pytest.raises(ValueError, match="needs lambda_filter > 0 or lambda_channel > 0"):
        GroupLasso(lambda_filter=0.0, lambda_channel=0.0)
    with pytest.raises(ValueError, match="start_epoch < end_epoch"):
        NetworkSlimming(start_epoch=3, end_epoch=2)
    with pytest.raises(ValueError, match="num_batches"):
        TaylorImportance(num_batches=0)


def run_ddp_script(tmp_path: Path, body: str, timeout: int) -> subprocess.CompletedProcess:
    """Run ``body`` as a script of its own (DDP starts its ranks from it), with the tests' helpers imported."""
    script = tmp_path / "ddp.py"
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom helpers import fmnist, tiny_trainer\n"
    script.write_text(prelude + body)
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, timeout=timeout, capture_output=True, text=True)


@pytest.mark.slow
def test_ddp_ranks_prune_the_same_channels(tmp_path: Path):
    """Two CPU processes (gloo) see different batches; taylor scores differ, the pruned layouts must not."""
    body = f"""
import json, torch
from pytorch_lightning import seed_everything
from distill import DistillModule
from distill.pruning import ChannelPruning, PruningSchedule
from students import create_student
seed_everything(0)
model = DistillModule(create_student("test_studentnet", num_classes=10, in_chans=1, num_pools=3), lr=0.01)
pruner = ChannelPruning("taylor", PruningSchedule(steps=1, final_ratio=0.5), num_batches=2)
trainer = tiny_trainer({str(tmp_path)!r}, max_epochs=2, strategy="ddp", devices=2, callbacks=[pruner])
trainer.fit(model, datamodule=fmnist())
with open({str(tmp_path)!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"channels": model.student.channels, "step": trainer.global_step}}, f)
"""
    done = run_ddp_script(tmp_path, body, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["channels"] != StudentNet(base=2).channels  # it did prune


@pytest.mark.slow
def test_a_refusal_under_ddp_stops_every_rank(tmp_path: Path):
    """Rank 0 decides the channels: its refusal reaches the other ranks, which would otherwise wait for its plan."""
    body = f"""
from test_timm_pruning import HardCodedSplit
from distill import DistillModule
from distill.pruning import ChannelPruning, PruningSchedule
pruner = ChannelPruning(schedule=PruningSchedule(steps=1, ratio=0.5), round_to=1)
trainer = tiny_trainer({str(tmp_path)!r}, strategy="ddp", devices=2, callbacks=[pruner])
try:
    trainer.fit(DistillModule(HardCodedSplit()), datamodule=fmnist())
except ValueError as err:
    print(f"rank {{trainer.global_rank}}: {{err}}")
"""
    done = run_ddp_script(tmp_path, body, timeout=120)
    refused = sorted(line.split(":")[0] for line in done.stdout.splitlines() if "pruning layer 'stem' breaks" in line)
    assert refused == ["rank 0", "rank 1"], done.stdout + done.stderr
