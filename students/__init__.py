"""Student architectures: StudentNet (seed 004), its width variants, and any timm model by name."""

from students.checkpoint import (
    build_student,
    describe_spec,
    extract_state_dict,
    is_pruned_from,
    load_student,
    load_weights,
    mark_pruned,
    read_checkpoint,
    recorded_spec,
    resize_to_state_dict,
    save_student,
    shape_attributes,
)
from students.registry import create_student, list_students, model_spec, register_student
from students.studentnet import UNSCALED_LAYERS, StudentNet, studentnet_channels, thin_channels, width_for_params
from students.timm_models import adapt_resnet_to_small_input, create_timm_model

__all__ = [
    "UNSCALED_LAYERS",
    "StudentNet",
    "adapt_resnet_to_small_input",
    "build_student",
    "create_student",
    "create_timm_model",
    "describe_spec",
    "extract_state_dict",
    "is_pruned_from",
    "list_students",
    "load_student",
    "load_weights",
    "mark_pruned",
    "model_spec",
    "read_checkpoint",
    "recorded_spec",
    "register_student",
    "resize_to_state_dict",
    "save_student",
    "shape_attributes",
    "studentnet_channels",
    "thin_channels",
    "width_for_params",
]
