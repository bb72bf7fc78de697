"""A small registry of student factories, in the style of timm's ``register_model``.

Each registered name is a small factory with its width in the name (``studentnet_050``). Any timm
model is also a student, by the name ``timm/<timm name>``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from students.studentnet import StudentNet
from students.timm_models import TIMM_PREFIX, create_timm_model

__all__ = ["create_student", "list_students", "model_spec", "register_student"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_student(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a student factory under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"a student named {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_students() -> list[str]:
    """Names of the registered students (timm models come on top, as ``timm/<name>``)."""
    return sorted(_REGISTRY)


def create_student(name: str, **kwargs: Any) -> nn.Module:
    """Build a student by name.

    Args:
        name: a registered name (see :func:`list_students`), or ``timm/<name>`` for any timm model.
        **kwargs: passed to the factory, e.g. ``num_classes``, ``in_chans``, ``width_mult``.
    """
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if name.startswith((TIMM_PREFIX, "hf-hub:")) or timm.is_model(name):
        return create_timm_model(name, **kwargs)
    close = difflib.get_close_matches(name, list_students(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown student {name!r}.{hint} Registered students: {', '.join(list_students())}; "
        f"or any timm model as 'timm/<name>' (e.g. timm/mobilenetv3_small_050, see timm.list_models())."
    )


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "kwargs"}`` that rebuild ``model`` with :func:`create_student`.

    Models built by :func:`create_student` or :class:`StudentNet` carry it; other modules cannot be
    rebuilt from a checkpoint alone.
    """
    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} carries no model_spec, so a checkpoint cannot rebuild it. Build students "
            f"with students.create_student(...) or students.StudentNet(...)."
        )
    return spec


#: The registered StudentNets: name -> width of layers 3..6 (``width_mult``). ``studentnet`` is seed 004:
#: 256,779 parameters for 3 channels and 11 classes; ``studentnet_050`` has 91,211.
STUDENTNET_WIDTHS = {"studentnet": 1.0, "studentnet_075": 0.75, "studentnet_050": 0.5, "studentnet_025": 0.25}


def _studentnet_factory(name: str, width_mult: float) -> Callable[..., StudentNet]:
    def factory(**kwargs: Any) -> StudentNet:
        return StudentNet(**{"width_mult": width_mult, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"StudentNet with layers 3..6 at width {width_mult}."
    return factory


for _name, _width in STUDENTNET_WIDTHS.items():
    register_student(_studentnet_factory(_name, _width))
