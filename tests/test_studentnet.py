"""StudentNet (seed 004), the student registry and timm students."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from students import (
    UNSCALED_LAYERS,
    StudentNet,
    create_student,
    list_students,
    model_spec,
    studentnet_channels,
    thin_channels,
    width_for_params,
)
from students.timm_models import check_timm_name

ROOT = Path(__file__).parents[1]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_defaults_are_the_seed_architecture():
    model = StudentNet()
    assert n_params(model) == 256_779
    assert model.channels == [16, 32, 64, 128, 256, 256, 256, 256]
    # The seed's module names, so its state_dicts load.
    keys = set(model.state_dict())
    assert {"cnn.0.0.weight", "cnn.1.0.weight", "cnn.1.3.weight", "cnn.7.3.bias", "fc.0.weight"} <= keys
    assert model.cnn[1][0].groups == 16  # depthwise
    assert model.cnn[1][3].kernel_size == (1, 1)  # pointwise


def test_width_mult_scales_layers_3_to_6_only():
    model = StudentNet(width_mult=0.5)
    assert n_params(model) == 91_211
    assert model.channels == [16, 32, 64, 64, 128, 128, 128, 256]
    assert studentnet_channels(16, 0.5) == model.channels
    # UNSCALED_LAYERS names exactly the layers whose output width_mult leaves alone
    wide = StudentNet()
    unchanged = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1}
    unchanged = {n for n in unchanged if wide.get_submodule(n).out_channels == model.get_submodule(n).out_channels}
    assert unchanged == set(UNSCALED_LAYERS)


def test_rebuilds_from_channels_alone():
    widths = [8, 12, 20, 33, 40, 41, 42, 50]
    model = StudentNet(channels=widths, num_classes=10, in_chans=1)
    assert model.channels == widths
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    rebuilt = create_student(model.model_spec["name"], **model.model_spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.channels == widths


@pytest.mark.parametrize(("num_pools", "side"), [(4, 1), (3, 3), (2, 7), (0, 28)])
def test_num_pools_keeps_resolution(num_pools: int, side: int):
    model = StudentNet(num_classes=10, in_chans=1, num_pools=num_pools)
    features = model.forward_features(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, 256, side, side)
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    assert model.forward_head(features).shape == (2, 10)
    assert n_params(model) == n_params(StudentNet(num_classes=10, in_chans=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": [8, 8]}, "8 positive widths"),
        ({"channels": [8, 8, 8, 8, 0, 8, 8, 8]}, "8 positive widths"),
        ({"width_mult": 0.0}, "width_mult"),
        ({"num_pools": 5}, "num_pools"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        StudentNet(**kwargs)


def test_registry_names_and_widths():
    production = {"studentnet", "studentnet_075", "studentnet_050", "studentnet_025"}
    assert set(list_students()) == production | {"test_studentnet"}  # the tests' tiny one, from tests/helpers.py
    assert n_params(create_student("studentnet")) == 256_779
    assert n_params(create_student("studentnet_050")) == 91_211
    for name, width in (("studentnet_075", 0.75), ("studentnet_025", 0.25)):
        model = create_student(name, num_classes=10)
        assert model.channels == StudentNet(width_mult=width).channels and model.__class__ is StudentNet
        assert model.model_spec["kwargs"]["num_classes"] == 10
    assert n_params(create_student("test_studentnet", num_classes=10, in_chans=1)) < 10_000
    assert create_student("studentnet", width_mult=0.5).channels == StudentNet(width_mult=0.5).channels
    assert create_student("studentnet_050", width_mult=0.25).channels == StudentNet(width_mult=0.25).channels


def test_the_production_registry_has_no_test_students():
    script = "import students; print(sorted(students.list_students()))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "['studentnet', 'studentnet_025', 'studentnet_050', 'studentnet_075']"


def test_unknown_student_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown student 'studentnet_05'.*Did you mean.*studentnet_050.*timm/"):
        create_student("studentnet_05")


def test_any_timm_model_is_a_student():
    model = create_student("timm/test_efficientnet", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model_spec(model) == {
        "name": "timm/test_efficientnet",
        "kwargs": {"num_classes": 10, "in_chans": 1, "small_input": False, "model_kwargs": {}},
    }
    with pytest.raises(ValueError, match="not a timm model"):
        create_student("timm/no_such_net")


def test_pretrained_weights_come_from_a_file_adapted_by_timm_and_the_student_rebuilds_without_it(tmp_path: Path):
    """timm's pretrained path without the hub: the file's weights, the stem's 3 input channels summed into 1 and a
    new classifier for 10 classes (timm's adaptation); a checkpoint's spec rebuilds it where the file is gone."""
    torch.manual_seed(0)
    hub = timm.create_model("test_resnet")  # stands for the hub's weights: RGB, 1000 classes
    path = tmp_path / "test_resnet.pth"
    torch.save(hub.state_dict(), path)
    overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
    student = create_student("timm/test_resnet", num_classes=10, in_chans=1, pretrained=True, model_kwargs=overlay)
    got, sent = student.state_dict(), hub.state_dict()
    assert torch.equal(got["layer1.0.conv1.weight"], sent["layer1.0.conv1.weight"])
    torch.testing.assert_close(got["conv1.0.weight"], sent["conv1.0.weight"].sum(1, keepdim=True))
    assert got["fc.weight"].shape == (10, *sent["fc.weight"].shape[1:])
    path.unlink()
    spec = model_spec(student)
    assert create_student(spec["name"], **spec["kwargs"])(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    missing = {"pretrained_cfg_overlay": {"file": str(path)}}  # timm itself logs an error and raises an empty one
    with pytest.raises(FileNotFoundError, match=r"weights file '.*test_resnet.pth' \(pretrained_cfg_overlay\) does"):
        create_student("timm/test_resnet", pretrained=True, model_kwargs=missing)
    with pytest.raises(ValueError, match="timm has no tag 'r161' for test_resnet: its tags are r160_in1k "):
        create_student("timm/test_resnet.r161")  # timm: a RuntimeError, even without pretrained
    assert check_timm_name("coatnet_0_224.untrained") == "coatnet_0_224.untrained"  # a tag timm has, without weights


def test_model_spec_of_a_foreign_module_is_a_clear_error():
    with pytest.raises(ValueError, match="no model_spec"):
        model_spec(torch.nn.Linear(2, 2))


def test_the_thin_studentnet_of_a_budget_has_its_scaled_layers_in_multiples_of_the_runtime_s():
    fmnist = {"num_classes": 10, "in_chans": 1, "num_pools": 3}

    def params(channels: list[int]) -> int:
        return sum(p.numel() for p in StudentNet(**fmnist, channels=channels).parameters())

    odd = studentnet_channels(16, width_for_params(100_000, **fmnist))  # width 0.539: [.., 68, 137, 137, 137, ..]
    channels = thin_channels(100_000, 8, **fmnist)
    assert odd[3:7] == [68, 137, 137, 137] and odd[:3] + odd[7:] == channels[:3] + channels[7:]
    assert channels[3:7] == [64, 128, 128, 128] and params(channels) <= 100_000  # width 0.5: 8 x 8, 1:2
    assert params([*channels[:3], 72, 144, 144, 144, channels[7]]) > 100_000  # the next multiple is over budget
    assert thin_channels(100_000, 8, **fmnist, width_mult=0.3)[3:7] == [32, 64, 64, 64]  # the widest: 0.3 -> 0.25
    assert thin_channels(400_000, 8, **fmnist, width_mult=2.0)[3] > 128  # and past 1.0 where the recipe's is
    assert thin_channels(5_000, 8, **fmnist) is None  # even 8 channels there are over budget
    assert thin_channels(5_000, 1, base=2, **fmnist)[3:7] == [14, 28, 28, 28]
