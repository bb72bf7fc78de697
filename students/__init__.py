"""Student architectures: StudentNet (seed 004), its width variants, and any timm model by name."""

from students.checkpoint import extract_state_dict, load_student, load_weights, read_checkpoint
from students.registry import create_student, list_students, model_spec, register_student
from students.studentnet import StudentNet, studentnet_channels
from students.timm_models import adapt_resnet_to_small_input, create_timm_model

__all__ = [
    "StudentNet",
    "adapt_resnet_to_small_input",
    "create_student",
    "create_timm_model",
    "extract_state_dict",
    "list_students",
    "load_student",
    "load_weights",
    "model_spec",
    "read_checkpoint",
    "register_student",
    "studentnet_channels",
]
