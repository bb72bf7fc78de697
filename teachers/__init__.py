"""Frozen teachers: any timm model loaded from a checkpoint, and ensembles of them."""

from teachers.ensemble import TeacherEnsemble
from teachers.frozen import FrozenModule, FrozenTeacher, weights_digest
from teachers.loading import load_teacher, load_teachers, teacher_checkpoints

__all__ = [
    "FrozenModule",
    "FrozenTeacher",
    "TeacherEnsemble",
    "load_teacher",
    "load_teachers",
    "teacher_checkpoints",
    "weights_digest",
]
