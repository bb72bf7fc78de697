"""Any timm model as a student or teacher, with a small-image stem for ResNets."""

from __future__ import annotations

from typing import Any

import timm
from timm.models.resnet import ResNet
from torch import nn

__all__ = ["TIMM_PREFIX", "adapt_resnet_to_small_input", "check_timm_name", "create_timm_model"]

#: Prefix that marks a timm model name in :func:`students.create_student` (``timm/resnet18``).
TIMM_PREFIX = "timm/"


def adapt_resnet_to_small_input(model: nn.Module) -> nn.Module:
    """Give a timm ResNet a 3x3 stride-1 stem and no max-pool, for 28x28 or 32x32 inputs.

    The standard stem (7x7 stride-2 conv, then a stride-2 max-pool) divides the resolution by 4
    before the first stage, so a 28x28 image reaches the last stage at 1x1. This is the usual
    CIFAR-style ResNet stem. A plain stem conv is replaced by a freshly initialised 3x3 conv (its
    pretrained weights, if any, cannot be kept); a deep stem keeps its weights with stride 1.
    """
    if not isinstance(model, ResNet):
        raise ValueError(
            f"small_input supports timm ResNet models (resnet18, resnet34, resnet50, resnet18d, ...), "
            f"got {type(model).__name__}. Resize the input instead (the datamodule's `resize`)."
        )
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 1, 1, bias=False)
    else:  # deep stem: a Sequential of 3x3 convs, the first with stride 2
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()
    return model


def check_timm_name(name: str) -> str:
    """``name`` without its ``timm/`` prefix; refused in one line when timm has no such model."""
    timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    if not timm_name.startswith("hf-hub:") and not timm.is_model(timm_name.split(".")[0]):
        raise ValueError(
            f"{timm_name!r} is not a timm model. List the available ones with "
            f"`python -c \"import timm; print(timm.list_models('*{timm_name[:6]}*'))\"`."
        )
    return timm_name


def create_timm_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: bool = False,
    small_input: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a timm model by name (``resnet18`` or ``timm/resnet18``).

    Args:
        name: a timm model name (see ``timm.list_models()``), optionally prefixed with ``timm/``,
            or ``hf-hub:<repo>`` for a Hugging Face Hub model.
        num_classes: outputs of the classifier.
        in_chans: input image channels.
        pretrained: load timm's pretrained weights (needs access to the Hugging Face Hub). The classifier,
            and the stem when ``small_input`` or ``in_chans`` differ, are adapted by timm.
        small_input: for ResNets, use a 3x3 stride-1 stem without max-pool (small images such as 28x28).
        model_kwargs: further keyword arguments for ``timm.create_model`` (e.g. ``drop_rate``).
    """
    timm_name = check_timm_name(name)
    model = timm.create_model(
        timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {})
    )
    if small_input:
        adapt_resnet_to_small_input(model)
    model.model_spec = {
        "name": TIMM_PREFIX + timm_name,
        "kwargs": {
            "num_classes": num_classes,
            "in_chans": in_chans,
            "small_input": small_input,
            "model_kwargs": dict(model_kwargs or {}),
        },
    }
    return model
