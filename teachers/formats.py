"""A teacher's weights from the files other tools write, read without running anything in them.

- timm's training scripts (``train.py``, :class:`timm.utils.CheckpointSaver`): ``state_dict``, and
  ``state_dict_ema`` when EMA was on (chosen with ``use_ema``: EMA weights often make the better teacher);
  ``args`` (an ``argparse.Namespace``, admitted by :data:`students.checkpoint.SAFE_GLOBALS`) names the
  architecture (``args.model``), its classes and input channels.
- Lightning checkpoints of any LightningModule: ``state_dict`` with the module's attribute prefix (``model.``,
  ``net.``, ...): the prefix is the one under which the file holds exactly the named architecture's keys.
- ``.safetensors`` files and ``pytorch_model.bin``-style plain state_dicts.
- A folder in the layout of timm's hub (``config.json`` with the architecture, and ``model.safetensors`` or
  ``pytorch_model.bin``), read offline.

Files are read by :func:`students.checkpoint.read_checkpoint` (``weights_only``, safetensors); settings taken
from files never make timm read or download other files (:func:`file_model_kwargs`).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from students.checkpoint import read_checkpoint

__all__ = [
    "EMA_KEYS",
    "TeacherFile",
    "describe_prefixes",
    "file_model_kwargs",
    "fit_prefix",
    "inferred_io",
    "read_hub_folder",
    "teacher_file",
]

#: Where checkpoints keep EMA weights: timm's ``CheckpointSaver``, then DeiT's and older timm scripts.
EMA_KEYS = ("state_dict_ema", "model_ema")
#: The weights file of a folder in timm's hub layout, in the order timm prefers them.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
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
    architecture timm's training scripts record in it (``args``, as ``train.py`` builds its model from them)."""
    container = next((state[k] for k in _WEIGHT_KEYS if isinstance(state.get(k), Mapping)), state)
    if use_ema:
        plain, container = container, next((state[k] for k in EMA_KEYS if isinstance(state.get(k), Mapping)), None)
        if container is None:
            ema = sorted({p for p in _prefixes(plain) if "ema" in p.lower()})
            hint = f"; its weights under {', '.join(map(repr, ema))} may be: pass prefix= instead" if ema else ""
            raise ValueError(
                f"{source} holds no EMA weights (no {' or '.join(EMA_KEYS)}; it holds {_keys(state)}){hint}: "
                f"drop use_ema."
            )
    weights = {k: v for k, v in container.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise ValueError(f"{source} holds no tensors where weights are kept (it holds {_keys(state)}).")
    args = vars(state["args"]) if isinstance(state.get("args"), argparse.Namespace) else {}
    arch = args.get("model") if isinstance(args.get("model"), str) else state.get("arch")
    if isinstance(arch, str) and arch == state.get("arch") and not timm.is_model(arch):
        arch = None  # CheckpointSaver without args records the class name in lower case ("resnet"), not a model
    kwargs = dict(args["model_kwargs"]) if isinstance(args.get("model_kwargs"), Mapping) else {}
    for arg, kwarg in (("gp", "global_pool"), ("bn_eps", "bn_eps"), ("bn_momentum", "bn_momentum")):
        if args.get(arg) is not None:  # train.py passes these to create_model when set
            kwargs.setdefault(kwarg, args[arg])
    return TeacherFile(
        weights, arch if isinstance(arch, str) else None, args.get("num_classes"), args.get("in_chans"), kwargs
    )


def read_hub_folder(folder: Path) -> TeacherFile:
    """A folder as timm's hub lays it out (``save_for_hf``): the architecture, classes and arguments from
    ``config.json``, the weights from ``model.safetensors`` or ``pytorch_model.bin`` (read as any checkpoint)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ValueError(
            f"Checkpoint {str(folder)!r} is a folder without a readable config.json naming its architecture: give a "
            f"checkpoint file, or a folder as timm's hub lays it out (timm.models.save_for_hf)."
        )
    weights_file = next((folder / n for n in HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights_file is None:
        raise ValueError(f"Checkpoint folder {str(folder)!r} holds none of {', '.join(HUB_WEIGHTS)}.")
    pretrained_cfg = config.get("pretrained_cfg", config)  # the older layout keeps everything at the top level
    kwargs = dict(config.get("model_args") or {})  # input channels: from here, or from the first conv's weights
    return TeacherFile(
        teacher_file(read_checkpoint(weights_file), False, f"Checkpoint {str(weights_file)!r}").weights,
        config["architecture"],
        kwargs.pop("num_classes", config.get("num_classes", pretrained_cfg.get("num_classes"))),
        kwargs.pop("in_chans", None),
        kwargs,
    )


def inferred_io(arch: str, weights: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """Classes and input channels of ``arch`` as ``weights`` hold them: the shapes of the classifier and the
    first conv that timm's pretrained config names (under any prefix), or ``None`` where they are not found."""
    try:
        cfg = get_pretrained_cfg(arch.removeprefix("timm/"))
    except RuntimeError:  # a pretrained tag timm does not know
        cfg = None
    if cfg is None:
        return None, None

    def first(module: Any) -> Any:  # a config may name several (a distilled ViT's two heads): the first
        return module[0] if isinstance(module, (tuple, list)) and module else module

    def weight(name: Any) -> torch.Tensor | None:
        if not isinstance(name, str):
            return None
        end = f"{name}.weight"
        prefixes = [k[: -len(end)] for k in weights if k == end or k.endswith(f".{end}")]
        # a ResNet's conv1 under a prefix, not its blocks' layer1.0.conv1 under the same prefix
        outer = [p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)]
        found = [weights[p + end] for p in outer]
        return found[0] if found and len({v.shape for v in found}) == 1 else None  # copies must agree

    head, stem = weight(first(cfg.classifier)), weight(first(cfg.first_conv))
    linear = head is not None and (head.dim() == 2 or (head.dim() == 4 and head.shape[2:] == (1, 1)))  # DLA: 1x1
    classes = head.shape[0] if linear else None
    if stem is None or stem.dim() != 4:
        return classes, None
    per_channel = _stem_inputs_per_channel(arch.removeprefix("timm/"), first(cfg.first_conv))
    return classes, stem.shape[1] // per_channel if stem.shape[1] % per_channel == 0 else None


@functools.lru_cache(maxsize=64)
def _stem_inputs_per_channel(arch: str, first_conv: str) -> int:
    """The input channels of ``arch``'s first conv per image channel: 16 where its stem moves 4x4 pixels into
    channels first (TResNet's space-to-depth), else 1; read from the model built on the meta device (no memory,
    no weights) with one input channel."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=1)
    except Exception:  # noqa: BLE001 - a model that needs other arguments: its stem is read as it is
        return 1
    stem = model.state_dict().get(f"{first_conv}.weight")
    return stem.shape[1] if stem is not None and stem.dim() == 4 and stem.shape[1] > 0 else 1


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
    own = model.state_dict()
    candidates = {key[:i] for key in weights for i in _starts(key) if key[i:] in own}
    fits = sorted(p for p in candidates if _under(weights, p).keys() == own.keys())
    if len(fits) > 1:  # several copies of the architecture: the one whose shapes fit, if only one does
        shaped = [p for p in fits if all(v.shape == own[k].shape for k, v in _under(weights, p).items())]
        fits = shaped if len(shaped) == 1 else fits
    if len(fits) > 1:
        raise ValueError(
            f"{source} holds this architecture's weights under several prefixes ({', '.join(map(repr, fits))}): "
            f"pass prefix= with the one to load."
        )
    return _under(weights, fits[0]) if fits else None


def describe_prefixes(weights: Mapping[str, Any], most: int = 6) -> str:
    """E.g. ``'model.' (62 tensors), 'loss.' (1)``: the tensors of a state_dict by their first name."""
    counts = Counter(_prefixes(weights))
    shown = [f"{p!r} ({n}{' tensors' if i == 0 else ''})" for i, (p, n) in enumerate(counts.most_common(most))]
    return ", ".join(shown) + (f", ... ({len(counts)} in all)" if len(counts) > most else "")


def file_model_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments a file (or a recorded teacher) may set: not those that read or download
    other files (``checkpoint_path``, ``pretrained*``, ``cache_dir``)."""
    return {k: v for k, v in kwargs.items() if k not in ("checkpoint_path", "cache_dir") and "pretrained" not in k}


def _prefixes(weights: Mapping[str, Any]) -> list[str]:
    """Each key's first name and its dot (``""`` for a top-level key)."""
    return [k.split(".", 1)[0] + "." if "." in k else "" for k in weights]


def _starts(key: str) -> list[int]:
    """Where ``key``'s names begin: 0 and after every dot."""
    return [0, *(i + 1 for i, c in enumerate(key) if c == ".")]


def _under(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _keys(state: Mapping[str, Any], most: int = 8) -> str:
    keys = list(state)
    return ", ".join(map(str, keys[:most])) + (f", ... ({len(keys)} keys)" if len(keys) > most else "")
