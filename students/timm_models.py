"""Any timm model as a student or teacher, with a small-image stem for ResNets."""

from __future__ import annotations

from pathlib import Path
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
    """``name`` without its ``timm/`` prefix; refused in one line when timm has no such model, or no such
    tag (``resnet18.a1_in1k``; ``coatnet_0_224.untrained`` has no weights: timm refuses an unknown tag even without
    ``pretrained``)."""
    timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    if timm_name.startswith("hf-hub:"):
        return timm_name
    arch, _, tag = timm_name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(
            f"{timm_name!r} is not a timm model. List the available ones with "
            f"`python -c \"import timm; print(timm.list_models('*{timm_name[:6]}*'))\"`."
        )
    tags = [known.partition(".")[2] for known in timm.list_models(f"{arch}.*", include_tags=True)]  # `untrained` too
    if tag and tag not in tags:
        raise ValueError(
            f"timm has no tag {tag!r} for {arch}: "
            f"{'its tags are ' + ', '.join(tags) if tags else 'it has none'} (or name {arch} without one)."
        )
    return timm_name


def _no_pretrained_weights(timm_name: str, err: OSError) -> str:
    """The line that says why ``timm_name``'s pretrained weights could not be read, and the ways to give them."""
    cause: BaseException = err
    while cause.__cause__ is not None:  # the hub's own error says little ("An error happened ..."); its cause why
        cause = cause.__cause__
    why = " ".join(str(cause).split()) or type(cause).__name__
    return (
        f"timm's pretrained weights of {timm_name} could not be read ({why}): "
        f"reach the Hugging Face Hub (or a mirror, HF_ENDPOINT); or download them once where it is reachable and "
        f"set HF_HUB_OFFLINE=1 to read the cache (HF_HOME); or give the file, "
        f"model_kwargs: {{pretrained_cfg_overlay: {{file: PATH}}}}; or set pretrained: false."
    )


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
        pretrained: load timm's pretrained weights: from the Hugging Face Hub (or its cache), or from a file
            given as ``model_kwargs={"pretrained_cfg_overlay": {"file": PATH}}``. The classifier, and the stem when
            ``small_input`` or ``in_chans`` differ, are adapted by timm. Weights that cannot be read are one
            ``OSError`` line naming these ways.
        small_input: for ResNets, use a 3x3 stride-1 stem without max-pool (small images such as 28x28).
        model_kwargs: further keyword arguments for ``timm.create_model`` (e.g. ``drop_rate``).
    """
    timm_name = check_timm_name(name)
    file = ((model_kwargs or {}).get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and file and not Path(file).is_file():  # timm logs an error and raises an empty one
        raise FileNotFoundError(f"The pretrained weights file {str(file)!r} (pretrained_cfg_overlay) does not exist")
    try:
        model = timm.create_model(
            timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {})
        )
    except OSError as err:  # the hub unreachable (its errors are OSErrors), or a file that cannot be read
        if not pretrained:
            raise
        raise OSError(_no_pretrained_weights(timm_name, err)) from None
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
