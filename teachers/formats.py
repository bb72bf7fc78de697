"""A teacher's weights from the files other tools write, read without running anything in them.

- timm's training scripts (``train.py``, :class:`timm.utils.CheckpointSaver`): ``state_dict``, and
  ``state_dict_ema`` when EMA was on (chosen with ``use_ema``: EMA weights often make the better teacher);
  ``args`` (an ``argparse.Namespace``, admitted by :data:`students.checkpoint.SAFE_GLOBALS`) names the
  architecture (``args.model``), its classes and input channels.
- Lightning checkpoints of any LightningModule: ``state_dict`` with the module's attribute prefix (``model.``,
  ``net.``, ...): the prefix is the one under which the file holds exactly the named architecture's keys.
- ``.safetensors`` files and ``pytorch_model.bin``-style plain state_dicts.
- A folder in the layout of timm's hub (``config.json`` with the architecture, and ``model.safetensors`` or
  ``pytorch_model.bin``), read offline with timm's readers.

Files are read by :func:`students.checkpoint.read_checkpoint` (``weights_only``, safetensors).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

__all__ = [
    "EMA_KEYS",
    "TeacherFile",
    "describe_prefixes",
    "fit_prefix",
    "inferred_io",
    "read_hub_folder",
    "teacher_file",
]

#: Where checkpoints keep EMA weights: timm's ``CheckpointSaver``, then DeiT's and older timm scripts.
EMA_KEYS = ("state_dict_ema", "model_ema")
#: Where checkpoints keep the weights: Lightning and timm, DeiT, ``{"module": ...}`` wrappers.
_WEIGHT_KEYS = ("state_dict", "model", "module")


@dataclass
class TeacherFile:
    """What a checkpoint holds to build a teacher from: its weights (with their prefixes), and what it says
    of the architecture (``None`` where it says nothing)."""

    weights: dict[str, torch.Tensor]
    arch: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def teacher_file(state: Mapping[str, Any], use_ema: bool, source: str) -> TeacherFile:
    """The weights ``state`` (a checkpoint read safely) holds (its EMA weights with ``use_ema``) and the
    architecture timm's training scripts record in it (``args``)."""
    if use_ema:
        container = next((state[k] for k in EMA_KEYS if isinstance(state.get(k), Mapping)), None)
        if container is None:
            raise ValueError(
                f"{source} holds no EMA weights (no {' or '.join(EMA_KEYS)}; it holds {_keys(state)}): drop use_ema."
            )
    else:
        container = next((state[k] for k in _WEIGHT_KEYS if isinstance(state.get(k), Mapping)), state)
    weights = {k: v for k, v in container.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise ValueError(f"{source} holds no tensors where weights are kept (it holds {_keys(state)}).")
    args = vars(state["args"]) if isinstance(state.get("args"), argparse.Namespace) else {}
    arch = args.get("model") if isinstance(args.get("model"), str) else state.get("arch")
    if isinstance(arch, str) and arch == state.get("arch") and not timm.is_model(arch):
        arch = None  # CheckpointSaver without args records the class name in lower case ("resnet"), not a model
    found = TeacherFile(weights, arch if isinstance(arch, str) else None)
    found.num_classes, found.in_chans = args.get("num_classes"), args.get("in_chans")
    if isinstance(args.get("model_kwargs"), Mapping):
        found.model_kwargs = dict(args["model_kwargs"])
    return found


def read_hub_folder(folder: Path) -> TeacherFile:
    """A folder as timm's hub lays it out (``save_for_hf``): the architecture, classes and arguments from
    ``config.json``, the weights from ``model.safetensors`` (or ``pytorch_model.bin``, ``weights_only``)."""
    from timm.models._hub import load_model_config_from_path, load_state_dict_from_path

    if not (folder / "config.json").is_file():
        raise ValueError(
            f"Checkpoint {str(folder)!r} is a folder without config.json: give a checkpoint file, or a folder as "
            f"timm's hub lays it out (timm.models.save_for_hf)."
        )
    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
        weights = load_state_dict_from_path(folder, weights_only=True)
    except Exception as err:  # noqa: BLE001 - timm raises RuntimeError, KeyError, UnpicklingError, ...
        raise ValueError(f"Checkpoint folder {str(folder)!r} could not be read as timm's hub layout: {err}") from None
    kwargs = dict(model_args or {})
    input_size = pretrained_cfg.get("input_size") or (None,)
    return TeacherFile(
        dict(weights),
        arch,
        kwargs.pop("num_classes", pretrained_cfg.get("num_classes")),
        kwargs.pop("in_chans", input_size[0]),
        kwargs,
    )


def inferred_io(arch: str, weights: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """Classes and input channels of ``arch`` as ``weights`` hold them: the shapes of the classifier and the
    first conv that timm's pretrained config names (under any prefix), or ``None`` where they are not found."""
    cfg = get_pretrained_cfg(arch.removeprefix("timm/"))
    if cfg is None:
        return None, None

    def weight(module: Any) -> torch.Tensor | None:
        name = module[0] if isinstance(module, (tuple, list)) and module else module
        if not isinstance(name, str):
            return None
        found = [v for k, v in weights.items() if k == f"{name}.weight" or k.endswith(f".{name}.weight")]
        return found[0] if found and len({v.shape for v in found}) == 1 else None  # copies must agree

    head, stem = weight(cfg.classifier), weight(cfg.first_conv)
    classes = head.shape[0] if head is not None and head.dim() == 2 else None
    channels = stem.shape[1] if stem is not None and stem.dim() == 4 else None
    return classes, channels


def fit_prefix(
    weights: Mapping[str, torch.Tensor], model: nn.Module, prefix: str | None, source: str
) -> dict[str, torch.Tensor] | None:
    """The weights of ``model`` in ``weights``, their prefix removed: the one given, or the one prefix under
    which ``weights`` holds exactly ``model``'s keys (a LightningModule's attribute, DDP's ``module.``, ...).
    ``None`` when no prefix fits (:func:`students.load_weights` then names the keys that do not)."""
    if prefix is not None:
        found = _under(weights, prefix)
        if not found:
            raise ValueError(
                f"{source} holds no weights under prefix={prefix!r}; its tensors are under {describe_prefixes(weights)}"
            )
        return found
    expected = set(model.state_dict())
    candidates = {key[:i] for key in weights for i in _starts(key) if key[i:] in expected}
    fits = sorted(p for p in candidates if _under(weights, p).keys() == expected)
    if len(fits) > 1:
        raise ValueError(
            f"{source} holds this architecture's weights under several prefixes ({', '.join(map(repr, fits))}): "
            f"pass prefix= with the one to load."
        )
    return _under(weights, fits[0]) if fits else None


def describe_prefixes(weights: Mapping[str, Any], most: int = 6) -> str:
    """E.g. ``'model.' (62 tensors), 'loss.' (1)``: the tensors of a state_dict by their first name."""
    counts = Counter(k.split(".", 1)[0] + "." if "." in k else "" for k in weights)
    shown = [f"{p!r} ({n}{' tensors' if i == 0 else ''})" for i, (p, n) in enumerate(counts.most_common(most))]
    return ", ".join(shown) + (f", ... ({len(counts)} in all)" if len(counts) > most else "")


def _starts(key: str) -> list[int]:
    """Where ``key``'s names begin: 0 and after every dot."""
    return [0, *(i + 1 for i, c in enumerate(key) if c == ".")]


def _under(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _keys(state: Mapping[str, Any], most: int = 8) -> str:
    keys = list(state)
    return ", ".join(map(str, keys[:most])) + (f", ... ({len(keys)} keys)" if len(keys) > most else "")
