"""Teachers: loading from checkpoints, freezing, the small-image stem, ensembles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from students import create_student, extract_state_dict, read_checkpoint
from teachers import FrozenTeacher, TeacherEnsemble, load_teacher

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_project_checkpoint_knows_its_architecture(teacher_checkpoint: Path):
    teacher = load_teacher(checkpoint=teacher_checkpoint)
    assert isinstance(teacher, FrozenTeacher)
    assert type(teacher.model).__name__ == "ResNet"
    assert teacher.num_classes == 10
    assert teacher.checkpoint == str(teacher_checkpoint)
    assert teacher(X).shape == (4, 10)


def test_teacher_is_frozen_even_when_a_parent_trains(teacher_checkpoint: Path):
    teacher = load_teacher(checkpoint=teacher_checkpoint)
    parent = nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(X.requires_grad_())
    assert not out.requires_grad


def test_contradicting_arguments_are_refused(teacher_checkpoint: Path):
    with pytest.raises(ValueError, match=r"contradicts name='resnet18'.*timm/test_resnet"):
        load_teacher("resnet18", checkpoint=teacher_checkpoint)
    with pytest.raises(ValueError, match=r"num_classes=11 \(checkpoint: 10\)"):
        load_teacher(checkpoint=teacher_checkpoint, num_classes=11)


def test_plain_state_dict_needs_the_architecture(tmp_path: Path, teacher_checkpoint: Path):
    reference = load_teacher(checkpoint=teacher_checkpoint)
    path = tmp_path / "plain.pt"
    torch.save(reference.model.state_dict(), path)
    with pytest.raises(ValueError, match=r"does not name its architecture .*pass name="):
        load_teacher(checkpoint=path)
    teacher = load_teacher("timm/test_resnet", checkpoint=path, num_classes=10, in_chans=1, small_input=True)
    torch.testing.assert_close(teacher(X), reference(X))
    teacher = load_teacher("timm/test_resnet", checkpoint=path, small_input=True)  # classes, channels: from shapes
    torch.testing.assert_close(teacher(X), reference(X))


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "state_dict", "model", "student."])
def test_key_prefixes_are_handled_in_one_place(tmp_path: Path, teacher_checkpoint: Path, wrap: str):
    reference = load_teacher(checkpoint=teacher_checkpoint)
    weights = reference.model.state_dict()
    saved = {wrap + k: v for k, v in weights.items()} if wrap.endswith(".") else {wrap: weights, "epoch": 3}
    assert extract_state_dict(saved).keys() == weights.keys()
    torch.save(saved, tmp_path / "w.pt")
    teacher = load_teacher("test_resnet", checkpoint=tmp_path / "w.pt", num_classes=10, in_chans=1, small_input=True)
    torch.testing.assert_close(teacher(X), reference(X))


def test_mismatching_checkpoint_names_keys_and_architecture(tmp_path: Path, teacher_checkpoint: Path):
    path = tmp_path / "plain.pt"
    torch.save(load_teacher(checkpoint=teacher_checkpoint).model.state_dict(), path)
    with pytest.raises(
        ValueError, match=r"(?s)do not fit the architecture timm/test_resnet\(num_classes=11.*fc\.weight"
    ):
        load_teacher("test_resnet", checkpoint=path, num_classes=11, in_chans=1, small_input=True)
    with pytest.raises(
        ValueError, match=r"(?s)timm/test_efficientnet.*missing keys: conv_stem.*unexpected keys: conv1"
    ):
        load_teacher("test_efficientnet", checkpoint=path, num_classes=10, in_chans=1)


def test_unreadable_checkpoints_are_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(checkpoint=tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_teacher(checkpoint=tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"refused as unsafe and nothing in it ran: .* import pathlib\.\w*Path, not a"):
        load_teacher("resnet18", checkpoint=tmp_path / "pickled.ckpt")
    (tmp_path / "text.ckpt").write_text("hello\n")  # torch.load raises KeyError on it
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_teacher(checkpoint=tmp_path / "text.ckpt")
    torch.save({"state_dict": {"w": torch.randn(64, 1024)}}, tmp_path / "whole.ckpt")
    whole = (tmp_path / "whole.ckpt").read_bytes()
    for cut in (100, 1000, 50_000, len(whole) // 2, len(whole) - 100):  # some end in OSError EINVAL, no file named
        (tmp_path / "cut.ckpt").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"'.*cut\.ckpt' is not a readable torch file \(truncated"):
            read_checkpoint(tmp_path / "cut.ckpt")


def test_small_input_stem_keeps_resolution():
    plain = create_student("timm/test_resnet", num_classes=10, in_chans=1)
    small = create_student("timm/test_resnet", num_classes=10, in_chans=1, small_input=True)
    assert all(conv.stride == (1, 1) for conv in small.conv1.modules() if isinstance(conv, nn.Conv2d))
    assert isinstance(small.maxpool, nn.Identity)
    plain_stem = create_student("timm/resnet18", num_classes=10, in_chans=1, small_input=True).conv1
    assert plain_stem.kernel_size == (3, 3) and plain_stem.stride == (1, 1)
    assert small.forward_features(X).shape[-1] == 4 * plain.forward_features(X).shape[-1]
    with pytest.raises(ValueError, match="small_input supports timm ResNet"):
        create_student("timm/test_efficientnet", small_input=True)


def _members() -> list[nn.Module]:
    torch.manual_seed(1)
    return [create_student("test_studentnet", num_classes=10, in_chans=1).eval() for _ in range(2)]


def test_ensemble_averages_logits_with_weights():
    a, b = _members()
    ensemble = TeacherEnsemble([a, b], weights=[3.0, 1.0], reduction="logits")
    torch.testing.assert_close(ensemble(X), 0.75 * a(X) + 0.25 * b(X))


def test_ensemble_averages_probabilities_at_temperature():
    a, b = _members()
    ensemble = TeacherEnsemble([a, b], weights=[1.0, 1.0], reduction="probs", temperature=4.0)
    expected = 0.5 * torch.softmax(a(X) / 4, -1) + 0.5 * torch.softmax(b(X) / 4, -1)
    torch.testing.assert_close(torch.softmax(ensemble(X) / 4, -1), expected)


def test_ensemble_is_frozen():
    ensemble = TeacherEnsemble(_members())
    nn.Sequential(ensemble).train()
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0]}, "one per teacher"),
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"reduction": "median"}, "reduction must be"),
        ({"weights": [1.0, float("inf")]}, "non-negative"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"temperature": 1e200}, "temperature must be a finite number > 0"),  # its logits were -inf
    ],
)
def test_ensemble_bad_arguments(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        TeacherEnsemble(_members(), **kwargs)


def test_ensemble_members_must_agree_on_classes():
    with pytest.raises(ValueError, match="same classes"):
        TeacherEnsemble([create_student("test_studentnet", num_classes=10), create_student("test_studentnet")])
    with pytest.raises(ValueError, match="at least one teacher"):
        TeacherEnsemble([])
    # modules that do not say their classes: the first forward compares their logits (torch.stack named no teacher)
    plain = TeacherEnsemble([torch.nn.Flatten(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))])
    with pytest.raises(ValueError, match=r"other shapes \(teacher 0: \(2, 4\), teacher 1: \(2, 3\)\): each must give"):
        plain(torch.zeros(2, 1, 2, 2))
