"""Pruning timm models: grouped convolutions, attention heads, layouts only the weights describe, and refusals
that leave the student as it was (issue 16; ``benchmarks/timm_zoo.py`` runs the same steps on 30 models)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import fmnist, tiny_trainer
from torch import nn

from distill import DistillModule
from distill.export import export_onnx
from distill.pruning import (
    ChannelPruning,
    PruningPolicy,
    PruningSchedule,
    TaylorImportance,
    channel_counts,
    check_latency_target,
    check_target,
    prune_student,
    surgery,
)
from distill.pruning.policy import removal_order
from distill.pruning.surgery import plan_pruning
from students import create_student, load_student, save_student

ROOT = Path(__file__).parents[1]
X = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def timm_student(name: str, **model_kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_student(f"timm/{name}", num_classes=10, in_chans=1, model_kwargs=model_kwargs).eval()


def grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups != m.out_channels}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_slices_lose_the_same_positions_ranked_by_their_mean_score():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 0.0])  # two slices of three: position means 3.5, 3.5, 2
    assert removal_order(scores, slices=2) == [2, 5, 0, 3, 1, 4]
    assert removal_order(scores) == torch.argsort(scores, stable=True).tolist()
    # keeping half of 6 channels is 3, rounded up to whole positions of both slices: 4
    assert plan_pruning({"g": scores}, 0.5, {"g": 1}, slices={"g": 2}) == {"g": [2, 5]}
    assert plan_pruning({"g": scores}, 0.5, {"g": 1}, global_ranking=True, slices={"g": 2}) == {"g": [2, 5]}
    assert plan_pruning({"g": scores}, 0.5, {"g": 1}) == {"g": [1, 3, 5]}


def test_grouped_convolutions_keep_their_groups_equal():
    model = timm_student("regnetx_002")
    before = {n: (m.groups, m.in_channels, m.out_channels) for n, m in grouped_convs(model).items()}
    report = prune_student(model, X[:1], PruningPolicy(round_to=1), ratio=0.5)
    after = grouped_convs(model)
    assert after.keys() == before.keys() and before
    for name, conv in after.items():
        groups, in_channels, out_channels = before[name]
        assert conv.groups == groups and conv.out_channels < out_channels and conv.in_channels < in_channels
        assert conv.out_channels % groups == 0 and conv.in_channels % groups == 0
        assert conv.weight.shape == (conv.out_channels, conv.in_channels // groups, *conv.kernel_size)
    assert model(X).shape == (3, 10)
    assert report.channels_after == channel_counts(model, X[:1])  # read from the model, not the plan


def test_attention_keeps_its_heads_and_each_loses_the_same_positions():
    model = timm_student("test_vit", img_size=32)
    heads = {n: (m.num_heads, m.head_dim) for n, m in model.named_modules() if hasattr(m, "qkv")}
    prune_student(model, X[:1], PruningPolicy(round_to=1), ratio=0.5)
    for name, (num_heads, head_dim) in heads.items():
        attention = model.get_submodule(name)
        assert attention.num_heads == num_heads and attention.head_dim == head_dim // 2
        assert attention.qkv.out_features == 3 * attention.attn_dim == 3 * num_heads * attention.head_dim
        assert attention.proj.in_features == attention.attn_dim
        assert model.model_spec["layout"][name]["head_dim"] == attention.head_dim  # what a checkpoint rebuilds
    assert model(X).shape == (3, 10)


def test_pruned_timm_students_reload_bit_exactly_in_a_fresh_process_and_export(tmp_path: Path):
    models = {"test_vit": {"img_size": 32}, "test_convnext": {}, "regnetx_002": {}, "test_efficientnet_gn": {}}
    for name, kwargs in models.items():
        model = timm_student(name, **kwargs)
        prune_student(model, X[:1], target_params=int(0.6 * sum(p.numel() for p in model.parameters())))
        save_student(model, tmp_path / f"{name}.pt", [1, 32, 32])
        with torch.no_grad():
            torch.save(model(X), tmp_path / f"{name}.logits.pt")
    code = (
        "import sys, torch; from students import load_student\n"
        "x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "for name in sys.argv[2:]:\n"
        "    with torch.no_grad(): out = load_student(f'{sys.argv[1]}/{name}.pt')(x)\n"
        "    print(name, torch.equal(out, torch.load(f'{sys.argv[1]}/{name}.logits.pt')))"
    )
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path), *models], capture_output=True, text=True,
                           cwd=ROOT, check=True)  # fmt: skip
    assert child.stdout.split() == [word for name in models for word in (name, "True")]
    pytest.importorskip("onnxruntime")
    from students import load_student

    # ConvNeXt was specialised to batch 1 when traced with one image; ONNX Runtime's check runs a batch of 3
    assert export_onnx(load_student(tmp_path / "test_convnext.pt"), X[:1], tmp_path / "convnext.onnx") < 1e-4


class HardCodedSplit(nn.Module):
    """Splits its stem's channels by sizes fixed at construction, like timm's MixedConv2d: pruning the stem
    breaks the split, pruning the branches does not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.splits = [8, 8]
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), self.splits, dim=1)
        return self.head(torch.cat([self.a(a), self.b(b)], 1).mean((2, 3)))


def test_a_plan_that_breaks_the_student_is_refused_naming_the_layer_and_nothing_changes():
    model = HardCodedSplit().eval()
    before, expected = state(model), model(X)
    refusal = (
        r"pruning layer 'stem' breaks the student \(RuntimeError: split_with_sizes.*unchanged.*layers=\['stem'\], "
        r"or ignore_unprunable to keep every such layer\)"
    )
    with pytest.raises(ValueError, match=refusal):
        prune_student(model, X[:1], PruningPolicy(round_to=1), ratio=0.5)
    with pytest.raises(ValueError, match=refusal):  # a size target: its smallest layout is checked first
        prune_student(model, X[:1], PruningPolicy(round_to=1), target_params=1000)
    with pytest.raises(ValueError, match=refusal):  # as jobs check it before they train
        check_target(model, X[:1], PruningPolicy(round_to=1), target_params=1000)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(X), expected)
    report = prune_student(model, X[:1], PruningPolicy(round_to=1, ignored_layers=["stem"]), ratio=0.5)  # as told
    assert report.channels_after == {"a": 8, "b": 8} and model.stem.out_channels == 16 and report.kept_layers == ()


def test_ignore_unprunable_keeps_the_layers_a_refusal_names_and_prunes_the_rest():
    policy = PruningPolicy(round_to=1, ignore_unprunable=True)
    assert check_target(HardCodedSplit(), X[:1], policy, target_params=1000).ignored_layers == ("stem",)
    model = HardCodedSplit().eval()
    report = prune_student(model, X[:1], policy, target_params=2000)
    assert report.kept_layers == ("stem",) and model.stem.out_channels == 16 and report.params_after <= 2000
    assert "kept whole (pruning them broke the student): stem" in str(report)
    with pytest.raises(ValueError, match=r"cannot be met .* \(ignore_unprunable kept these layers whole: stem\)$"):
        prune_student(HardCodedSplit(), X[:1], policy, target_params=300)  # out of reach with the stem kept
    model = HardCodedSplit().eval()  # data-driven: each attempt's criterion reads the same batches
    batches = iter([(X, torch.arange(3)), (X, torch.arange(3))])
    report = prune_student(model, X[:1], replace(policy, importance="taylor", num_batches=2), ratio=0.5, data=batches)
    assert report.kept_layers == ("stem",) and report.channels_after == {"a": 8, "b": 8}


def test_a_latency_target_names_a_layer_whose_pruning_breaks_the_student_before_timing_anything():
    """The search times copies down to every layer's floor; a broken one reached the exporter, whose many-line error
    named no layer, and ignore_unprunable could not keep it."""
    timed = []

    def by_params(models: dict[str, nn.Module]) -> dict[str, float]:  # deterministic: a millisecond per 1,000
        timed.append(sorted(models))
        return {name: sum(p.numel() for p in m.parameters()) / 1000 for name, m in models.items()}

    start = by_params({"student": HardCodedSplit()})["student"]
    timed.clear()
    model = HardCodedSplit().eval()
    before = state(model)
    with pytest.raises(ValueError, match=r"^pruning layer 'stem' breaks the student \(RuntimeError: split_with_sizes"):
        prune_student(model, X[:1], PruningPolicy(round_to=1), target_latency_ms=0.7 * start, latency=by_params)
    assert timed == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    policy = PruningPolicy(round_to=1, ignore_unprunable=True)
    report = prune_student(model, X[:1], policy, target_latency_ms=0.7 * start, latency=by_params)
    assert report.kept_layers == ("stem",) and model.stem.out_channels == 16 and report.latency_ms <= 0.7 * start
    assert model.a.out_channels < 16 and model(X).shape == (3, 10)
    with pytest.raises(ValueError, match=r"cannot be met: .* \(ignore_unprunable kept these layers whole: stem\)$"):
        check_latency_target(HardCodedSplit(), X[:1], policy, 0.05 * start, by_params)  # as jobs check it first


def test_a_graph_that_takes_too_long_is_refused(monkeypatch: pytest.MonkeyPatch):
    model = timm_student("test_vit", img_size=32)
    before = state(model)
    monkeypatch.setattr(surgery, "GRAPH_TIMEOUT_S", 1e-4)
    with pytest.raises(ValueError, match=r"did not finish tracing VisionTransformer within 0.0001 s.*GRAPH_TIMEOUT"):
        prune_student(model, X[:1], ratio=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class CachesInEval(nn.Module):
    """Computes a tensor once in eval mode and reuses it until put in train mode, like timm's LeViT attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 10)
        self.cache: torch.Tensor | None = None

    def train(self, mode: bool = True) -> CachesInEval:
        self.cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.cache is None:
            self.cache = self.bias * 2
        return self.head((self.conv(x) + self.cache[:, None, None]).mean((2, 3)))


def test_a_model_that_caches_in_eval_mode_gets_taylor_scores_and_is_pruned():
    model = CachesInEval().eval()
    batches = [(X[:2], torch.tensor([1, 2])), (X[1:], torch.tensor([3, 4]))]
    taylor = TaylorImportance(num_batches=2)
    taylor.collect(model, batches)  # a second backward through the cached tensor would fail
    assert not model.training
    copy.deepcopy(model)  # pruning copies the student: a cached tensor with a graph cannot be copied
    reference = CachesInEval()  # the same sum of mean losses, by hand
    sum(F.cross_entropy(reference(x), y) for x, y in batches).backward()
    expected = (reference.conv.weight.grad * reference.conv.weight).flatten(1).sum(1).abs()
    assert torch.allclose(taylor.scores[model.conv], expected)
    report = prune_student(model, X[:1], PruningPolicy("taylor", round_to=1), ratio=0.5, data=batches)
    assert report.channels_after == {"conv": 4} and model(X).shape == (3, 10)  # traced in eval mode, then copied


def test_channel_pruning_keeps_the_unprunable_layers_it_finds_while_training(tmp_path: Path):
    torch.manual_seed(0)
    pruner = ChannelPruning(schedule=PruningSchedule(steps=2, ratio=0.25), round_to=1, ignore_unprunable=True)
    model = DistillModule(HardCodedSplit())
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[pruner]).fit(model, datamodule=fmnist())
    assert [r.kept_layers for r in pruner.reports] == [("stem",), ("stem",)] and pruner.policy.ignored_layers == ()
    assert pruner.state_dict()["kept_layers"] == ["stem"]  # a resumed fit keeps them without finding them again
    assert model.student.stem.out_channels == 16 and model.student.a.out_channels == 9  # 16, 12, then 9


def test_a_pruned_timm_layout_from_scratch_keeps_timms_initialisation(tmp_path: Path):
    """Each tensor is the leading slice of a new unpruned model's, as pruning it would leave it: before, every layer
    got PyTorch's defaults (the stem's std 0.19 against timm's 0.11, the zeroed last BatchNorm of a block at 1)."""
    model = timm_student("test_resnet")
    prune_student(model, X[:1], PruningPolicy("l1", round_to=1), ratio=0.5)
    path = save_student(model, tmp_path / "pruned.ckpt")
    torch.manual_seed(3)
    fresh = load_student(path, from_scratch=True).state_dict()
    torch.manual_seed(3)
    unpruned = create_student("timm/test_resnet", num_classes=10, in_chans=1).state_dict()  # the spec, unpruned
    resized = [k for k, v in fresh.items() if v.shape != unpruned[k].shape]
    assert "layer1.0.bn2.weight" in resized and not unpruned["layer1.0.bn2.weight"].any()  # timm zeroes it
    for key, tensor in fresh.items():
        assert torch.equal(tensor, unpruned[key][tuple(slice(0, n) for n in tensor.shape)]), key
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in model.state_dict().items()}
