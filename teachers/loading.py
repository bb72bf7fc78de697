"""Build a frozen teacher from a timm name, a checkpoint of this project, or the files other tools write.

:func:`load_teachers` and :func:`teacher_checkpoints` turn ``DistillModule``'s ``teacher_checkpoint`` into a
teacher and back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import split_model_name_tag
from torch import nn

from students import create_timm_model
from students.checkpoint import (
    describe_spec,
    extract_state_dict,
    load_recorded_student,
    load_weights,
    read_checkpoint,
    recorded_spec,
)
from teachers.ensemble import TeacherEnsemble
from teachers.formats import (
    describe_prefixes,
    file_model_kwargs,
    fit_prefix,
    inferred_io,
    read_hub_folder,
    teacher_file,
)
from teachers.frozen import FrozenTeacher

__all__ = ["load_teacher", "load_teachers", "teacher_checkpoints"]


def load_teacher(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    small_input: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    prefix: str | None = None,
) -> FrozenTeacher:
    """Build a teacher and return it frozen (no gradients, eval mode locked).

    Args:
        name: a timm model name (``resnet18`` or ``timm/resnet18``) or a registered student name.
            Optional with a checkpoint that names its architecture: one written by this project, by timm's
            training scripts (``args.model``), or a folder in timm's hub layout (``config.json``).
        checkpoint: a Lightning checkpoint written by ``distill fit`` (the architecture is read from it), a
            checkpoint of timm's ``train.py`` (``model_best.pth.tar``), a Lightning checkpoint of another
            LightningModule, a ``.safetensors`` file or plain state_dict, or a folder as timm's hub lays it out
            (:mod:`teachers.formats`). Nothing in the file runs: it is read with ``weights_only``.
        num_classes: classifier outputs (default: as the checkpoint says, or as its classifier's weights
            hold; else timm's 1000).
        in_chans: input image channels (default: as the checkpoint says, or as its first conv holds; else 3).
        pretrained: start from timm's pretrained weights (needs access to the Hugging Face Hub).
        small_input: ResNets only: a 3x3 stride-1 stem without max-pool, for 28x28/32x32 images.
        model_kwargs: further keyword arguments for ``timm.create_model``.
        use_ema: load the checkpoint's EMA weights (``state_dict_ema`` of timm's scripts) instead of its
            ``state_dict``.
        prefix: the prefix of the architecture's keys in the checkpoint (e.g. ``net.`` of a LightningModule
            holding it as ``self.net``); by default, the one prefix under which all of them are.
    """
    if name is None and checkpoint is None:
        raise ValueError("load_teacher needs a model name, a checkpoint, or both")
    if checkpoint is None:
        model = _build(name, num_classes, in_chans, pretrained, small_input, model_kwargs)
        return FrozenTeacher(model)
    source = f"Checkpoint {str(checkpoint)!r}"
    if Path(checkpoint).is_dir():
        found = read_hub_folder(Path(checkpoint))
    else:
        state = read_checkpoint(checkpoint)
        spec = recorded_spec(state, source)
        if spec is not None:  # written by this project: it knows its architecture
            _check_against_spec(spec, checkpoint, name=name, num_classes=num_classes, in_chans=in_chans)
            if use_ema or prefix is not None:
                raise ValueError(f"{source} was written by distill and holds one student: drop use_ema and prefix")
            return FrozenTeacher(load_recorded_student(state, checkpoint), checkpoint=str(checkpoint))
        found = teacher_file(state, use_ema, source)
    named = found.arch
    if named is not None and not named.startswith("hf-hub:") and not timm.is_model(_architecture(named)):
        found.arch = None  # a model registered in the trainer's own code: a hint, and name= decides
    if found.arch is not None:
        io = {k: v for k, v in (("num_classes", found.num_classes), ("in_chans", found.in_chans)) if v is not None}
        _check_against_spec({"name": found.arch, "kwargs": io}, checkpoint, name=name, num_classes=num_classes,
                            in_chans=in_chans)  # fmt: skip
    name = name or found.arch
    if name is None:
        said = f"names {named!r}, not a timm model here" if named else "does not name its architecture"
        raise ValueError(
            f"{source} {said} (its weights are under {describe_prefixes(found.weights)}): pass name= (and "
            f"small_input, model_kwargs as it was trained)."
        )
    scope = found.weights if prefix is None else {k: v for k, v in found.weights.items() if k.startswith(prefix)}
    classes, channels = inferred_io(name, scope)
    num_classes = next((n for n in (num_classes, found.num_classes, classes) if n is not None), None)
    in_chans = next((n for n in (in_chans, found.in_chans, channels) if n is not None), None)
    kwargs = {**file_model_kwargs(found.model_kwargs), **(model_kwargs or {})}
    model = _build(name, num_classes, in_chans, False, small_input, kwargs)
    weights = fit_prefix(found.weights, model, prefix, source)
    hint = "" if weights is not None else f" Its tensors are under {describe_prefixes(found.weights)} (prefix=)."
    arch = describe_spec(model.model_spec)
    load_weights(model, weights if weights is not None else extract_state_dict(found.weights), source, arch, hint)
    given = {"checkpoint": str(checkpoint), "name": name, "num_classes": num_classes, "in_chans": in_chans,
             "small_input": small_input, "model_kwargs": model_kwargs, "use_ema": use_ema,
             "prefix": prefix}  # fmt: skip
    load_args = {k: v for k, v in given.items() if v is not None and v is not False and v != {}}  # loads it again
    return FrozenTeacher(model, checkpoint=str(checkpoint), load_args=load_args)


def _build(
    name: str,
    num_classes: int | None,
    in_chans: int | None,
    pretrained: bool,
    small_input: bool,
    model_kwargs: dict[str, Any] | None,
) -> nn.Module:
    """The timm model ``name`` (timm's defaults for unset classes and channels)."""
    model = create_timm_model(
        name,
        num_classes=1000 if num_classes is None else num_classes,
        in_chans=3 if in_chans is None else in_chans,
        pretrained=pretrained,
        small_input=small_input,
        model_kwargs=model_kwargs,
    )
    if pretrained and num_classes not in (None, model.pretrained_cfg.get("num_classes")):
        warnings.warn(
            f"Teacher {name} is pretrained on {model.pretrained_cfg.get('num_classes')} classes; its new "
            f"{num_classes}-class head is untrained. Fine-tune it first (distill fit with it as the student).",
            stacklevel=3,
        )
    return model


#: The keys of a recorded teacher (:func:`teacher_checkpoints`) that :func:`load_teachers` takes.
_RECORDED_ARGS = ("checkpoint", "name", "num_classes", "in_chans", "small_input", "model_kwargs", "use_ema", "prefix")
_RECORDED_ENSEMBLE = ("teachers", "weights", "reduction", "temperature")


def load_teachers(checkpoint: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]]) -> nn.Module:
    """The teacher :func:`teacher_checkpoints` recorded: a checkpoint path, :func:`load_teacher`'s arguments as a
    dict (a checkpoint, never downloads), an ensemble as a dict of its teachers and settings, or a list of
    these (an equally weighted ensemble)."""
    if isinstance(checkpoint, str):
        return load_teacher(checkpoint=checkpoint)
    if isinstance(checkpoint, Mapping) and "teachers" in checkpoint:
        _check_keys(checkpoint, _RECORDED_ENSEMBLE)
        members = [load_teachers(c) for c in checkpoint["teachers"]]
        return TeacherEnsemble(members, **{k: v for k, v in checkpoint.items() if k != "teachers"})
    if isinstance(checkpoint, Mapping):
        _check_keys(checkpoint, _RECORDED_ARGS)
        if not checkpoint.get("checkpoint"):
            raise ValueError(f"a recorded teacher needs its checkpoint, got {dict(checkpoint)}")
        kwargs = dict(checkpoint.get("model_kwargs") or {})
        return load_teacher(**{**checkpoint, "model_kwargs": file_model_kwargs(kwargs)})
    return TeacherEnsemble([load_teachers(c) for c in checkpoint])


def teacher_checkpoints(teacher: nn.Module) -> str | dict[str, Any] | None:
    """What :func:`load_teachers` loads ``teacher`` again from: its checkpoint path, :func:`load_teacher`'s
    arguments where the file does not say all (its architecture, EMA, a prefix), an ensemble's members and
    settings; ``None`` if a teacher (or a member) was not loaded from a file."""
    if isinstance(teacher, TeacherEnsemble):
        members = [teacher_checkpoints(t) for t in teacher.teachers]
        if any(m is None for m in members):
            return None
        weights = [round(w, 6) for w in teacher.weights.tolist()]
        return {"teachers": members, "weights": weights, "reduction": teacher.reduction,
                "temperature": teacher.temperature}  # fmt: skip
    return getattr(teacher, "source", None)


def _check_keys(recorded: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(recorded) - set(allowed))
    if unknown:
        raise ValueError(f"a recorded teacher holds {', '.join(unknown)}; it may hold only {', '.join(allowed)}")


def _architecture(name: str) -> str:
    """``resnet18`` of ``timm/resnet18.a1_in1k``: the model without the hub's prefix or a pretrained tag."""
    return split_model_name_tag(name.removeprefix("timm/"))[0]


def _check_against_spec(spec: dict[str, Any], checkpoint: Any, **requested: Any) -> None:
    """Refuse explicit arguments that contradict the architecture recorded in the checkpoint."""
    recorded = {"name": spec["name"], **spec["kwargs"]}
    conflicts = []
    for key, value in requested.items():
        if value is None or recorded.get(key) is None:  # asked for nothing, or the file says nothing
            continue
        have = recorded.get(key)
        same = value == have
        if key == "name":  # "resnet18", "timm/resnet18" and "resnet18.a1_in1k" are the same architecture
            same = _architecture(value) == _architecture(str(have))
        if not same:
            conflicts.append(f"{key}={value!r} (checkpoint: {have!r})")
    if conflicts:
        raise ValueError(
            f"Checkpoint {str(checkpoint)!r} holds {describe_spec(spec)}, which contradicts "
            f"{', '.join(conflicts)}. Drop these arguments (the checkpoint knows its architecture) "
            f"or load the checkpoint that matches them."
        )
