"""Build a frozen teacher from a timm name, a checkpoint of this project, or a plain state_dict.

:func:`load_teachers` and :func:`teacher_checkpoints` turn ``DistillModule``'s ``teacher_checkpoint`` into a
teacher and back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
) -> FrozenTeacher:
    """Build a teacher and return it frozen (no gradients, eval mode locked).

    Args:
        name: a timm model name (``resnet18`` or ``timm/resnet18``) or a registered student name.
            Optional with a checkpoint written by this project, which records its architecture.
        checkpoint: a Lightning checkpoint written by ``distill fit`` (the architecture is read from it),
            or a plain state_dict file (then ``name``, ``num_classes``, ``in_chans`` and ``small_input``
            must describe the architecture it was saved from).
        num_classes: classifier outputs (timm's default 1000 when unset and not in the checkpoint).
        in_chans: input image channels (3 when unset and not in the checkpoint).
        pretrained: start from timm's pretrained weights (needs access to the Hugging Face Hub).
        small_input: ResNets only: a 3x3 stride-1 stem without max-pool, for 28x28/32x32 images.
        model_kwargs: further keyword arguments for ``timm.create_model``.
    """
    if name is None and checkpoint is None:
        raise ValueError("load_teacher needs a model name, a checkpoint, or both")
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    spec = recorded_spec(state, f"Checkpoint {str(checkpoint)!r}") if state is not None else None
    if spec is not None:
        _check_against_spec(spec, checkpoint, name=name, num_classes=num_classes, in_chans=in_chans)
        return FrozenTeacher(load_recorded_student(state, checkpoint), checkpoint=str(checkpoint))
    if name is None:
        raise ValueError(
            f"Checkpoint {str(checkpoint)!r} is a plain state_dict that does not record its architecture: "
            f"pass name= (and num_classes, in_chans, small_input as it was trained)."
        )
    model = create_timm_model(
        name,
        num_classes=1000 if num_classes is None else num_classes,
        in_chans=3 if in_chans is None else in_chans,
        pretrained=pretrained and state is None,
        small_input=small_input,
        model_kwargs=model_kwargs,
    )
    if pretrained and state is None and num_classes not in (None, model.pretrained_cfg.get("num_classes")):
        warnings.warn(
            f"Teacher {name} is pretrained on {model.pretrained_cfg.get('num_classes')} classes; its new "
            f"{num_classes}-class head is untrained. Fine-tune it first (distill fit with it as the student).",
            stacklevel=2,
        )
    if state is not None:
        load_weights(model, extract_state_dict(state), repr(str(checkpoint)), describe_spec(model.model_spec))
    return FrozenTeacher(model, checkpoint=None if checkpoint is None else str(checkpoint))


def load_teachers(checkpoint: str | Sequence[str]) -> FrozenTeacher | TeacherEnsemble:
    """The teacher of one checkpoint file, or the ensemble of the teachers of a list of them."""
    if isinstance(checkpoint, str):
        return load_teacher(checkpoint=checkpoint)
    return TeacherEnsemble([load_teacher(checkpoint=path) for path in checkpoint])


def teacher_checkpoints(teacher: nn.Module) -> str | list[str] | None:
    """The checkpoint file(s) ``teacher`` was loaded from, as :func:`load_teachers` takes them; ``None`` if unknown."""
    paths = list(getattr(teacher, "checkpoints", []))
    if not paths:
        return None
    return paths[0] if len(paths) == 1 and not isinstance(teacher, TeacherEnsemble) else paths


def _check_against_spec(spec: dict[str, Any], checkpoint: Any, **requested: Any) -> None:
    """Refuse explicit arguments that contradict the architecture recorded in the checkpoint."""
    recorded = {"name": spec["name"], **spec["kwargs"]}
    conflicts = []
    for key, value in requested.items():
        if value is None:
            continue
        have = recorded.get(key)
        same = value == have
        if key == "name":  # "resnet18" and "timm/resnet18" are the same model
            same = value.removeprefix("timm/") == str(have).removeprefix("timm/")
        if not same:
            conflicts.append(f"{key}={value!r} (checkpoint: {have!r})")
    if conflicts:
        raise ValueError(
            f"Checkpoint {str(checkpoint)!r} holds {describe_spec(spec)}, which contradicts "
            f"{', '.join(conflicts)}. Drop these arguments (the checkpoint knows its architecture) "
            f"or load the checkpoint that matches them."
        )
