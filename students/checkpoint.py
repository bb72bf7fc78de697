"""The checkpoint format: what this project writes into checkpoints, and every reader of them.

A ``DistillModule`` checkpoint is Lightning's dict with, in addition:

- ``hyper_parameters["student_spec"]``: the student's architecture, ``{"name", "kwargs"[, "pruned", "layout"]}``
  (:func:`record_student`, :func:`recorded_spec`; a pruned timm student's ``layout``: :func:`mark_pruned`);
- ``state_dict``: the student's weights under the ``student.`` prefix (the teacher is never saved);
- ``input_shape``: ``[channels, height, width]`` of the training data (:func:`recorded_input_shape`);
- ``rng_states``: the random states of torch, numpy and Python, for exact resumes (:func:`record_rng_states`).

A student file (:func:`save_student`) has the first three and no training state. :func:`extract_state_dict`
also reads the weights of other layouts and plain state_dicts; all prefix handling lives there.
"""

from __future__ import annotations

import argparse
import errno
import io
import numbers
import os
import pickle
import pickletools
import random
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from students.modes import eval_mode
from students.registry import create_student, model_spec
from students.studentnet import StudentNet

__all__ = [
    "INPUT_SHAPE_KEY",
    "LAYOUT_KEY",
    "RNG_STATES_KEY",
    "SPEC_KEY",
    "STUDENT_PREFIX",
    "apply_layout",
    "build_student",
    "checked_input_shape",
    "describe_spec",
    "extract_state_dict",
    "is_pruned_from",
    "is_training_checkpoint",
    "load_recorded_student",
    "load_student",
    "load_weights",
    "read_checkpoint",
    "record_rng_states",
    "record_student",
    "recorded_data",
    "recorded_input_shape",
    "recorded_spec",
    "restore_rng_states",
    "save_student",
    "shape_attributes",
]

#: Key prefix of the student's weights inside a ``DistillModule`` checkpoint.
STUDENT_PREFIX = "student."
#: The student's architecture, under ``hyper_parameters``.
SPEC_KEY = "student_spec"
#: ``[channels, height, width]`` of the data the student was trained on.
INPUT_SHAPE_KEY = "input_shape"
#: The random states of a training checkpoint.
RNG_STATES_KEY = "rng_states"
#: Containers that wrap a state_dict in common checkpoint formats (Lightning, timm/DeiT, ...).
_CONTAINER_KEYS = ("state_dict", "model", "module")
#: Classes a checkpoint may hold besides tensors and plain values: plain containers that run no code when
#: unpickled (timm's ``train.py`` saves its command-line ``args``).
SAFE_GLOBALS = [argparse.Namespace]
#: Prefixes added by wrappers: DDP/DataParallel, torch.compile, and this project's FrozenTeacher.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def record_student(checkpoint: dict[str, Any], student: nn.Module, input_shape: Sequence[int] | None = None) -> None:
    """Record ``student``'s architecture (when it has a ``model_spec``) and the input shape in ``checkpoint``."""
    spec = getattr(student, "model_spec", None)
    if spec is not None:
        checkpoint.setdefault("hyper_parameters", {})[SPEC_KEY] = spec
    if input_shape is not None:
        checkpoint[INPUT_SHAPE_KEY] = list(input_shape)


def recorded_input_shape(checkpoint: Mapping[str, Any], source: str = "The checkpoint") -> list[int] | None:
    """The ``[channels, height, width]`` a checkpoint records, or ``None``; refuses any other record."""
    shape = checkpoint.get(INPUT_SHAPE_KEY)
    if shape is None:
        return None
    try:
        return checked_input_shape(shape)
    except ValueError:
        why = f"{source} records the input shape {shape!r}, not [channels, height, width]: pass input_size"
        raise ValueError(why) from None


def recorded_data(checkpoint: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The datamodule class name and record (``SplitDataModule.state_dict``) that a checkpoint of a run on one of
    distill's datamodules holds (Lightning keeps it under the class name); ``None`` for any other."""
    return next(((name, value) for name, value in checkpoint.items()
                 if isinstance(value, dict) and {"split", "batches"} <= value.keys()), None)  # fmt: skip


def is_training_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` was written by the Trainer (resumable), not by :func:`save_student`."""
    return "pytorch-lightning_version" in checkpoint


def record_rng_states(checkpoint: dict[str, Any]) -> None:
    """Record the random states of torch (CPU and this process's CUDA device), numpy and Python.

    As tensors and plain values, so that checkpoints still load with ``weights_only=True``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    checkpoint[RNG_STATES_KEY] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(state), gauss],
    }


def restore_rng_states(checkpoint: Mapping[str, Any]) -> None:
    """Set the random states :func:`record_rng_states` recorded, if the checkpoint has them."""
    states = checkpoint.get(RNG_STATES_KEY)
    if states is None:
        return
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely onto the CPU, with clear errors.

    Torch files are read with ``weights_only=True``, admitting beside tensors and plain values only the
    containers of :data:`SAFE_GLOBALS` (timm's training scripts save their ``argparse.Namespace``);
    ``.safetensors`` files hold tensors only. A file that would run or import anything else when unpickled is
    refused as unsafe, naming what it asks for, and nothing of it runs; anything else torch cannot read (a
    text file, random bytes, a truncated copy) is called unreadable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Checkpoint {str(path)!r} is a folder, not a checkpoint file.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist. Train one first or fix the path.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the safe loader stopped: say why, never "corrupt"
        wanted = _unsafe_globals(path) or re.findall(r"GLOBAL (\S+)", str(err))
        if wanted:
            what = "a tensor or a plain value" if len(wanted) == 1 else "tensors or plain values"
            raise ValueError(
                f"Checkpoint {str(path)!r} was refused as unsafe and nothing in it ran: loading it would import "
                f"{', '.join(wanted)}, not {what} (a pickle can run code). Ask its author for a .safetensors file "
                f"or a state_dict (torch.save(model.state_dict(), path)); for a LightningModule's checkpoint, "
                f"save_hyperparameters(ignore=[...]) keeps such objects out of it."
            ) from None
        reason = next((line for line in str(err).splitlines() if "Unsupported" in line), "").strip()
        if zipfile.is_zipfile(path):  # torch's format, with a pickle the safe loader does not take
            raise ValueError(
                f"Checkpoint {str(path)!r} was refused by torch's safe loader (weights_only) and nothing in it "
                f"ran{': ' + reason if reason else ''}. Save it again with torch.save's default pickle protocol, or "
                f"as .safetensors."
            ) from None
    except OSError as err:  # the file could not be read at all: say so, not "corrupt"; but torch's zip reader
        if err.errno != errno.EINVAL or err.filename is not None:  # seeks past the end of a truncated copy (EINVAL)
            raise
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - torch.load fails on foreign files with any error (KeyError, IndexError, ...)
        pass
    else:
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"Checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict or a dict of them."
            )
        return dict(obj)
    raise ValueError(f"Checkpoint {str(path)!r} is not a readable torch file (truncated, corrupt, or another format).")


def _read_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file (a plain state_dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"Checkpoint {str(path)!r} is not a readable safetensors file: {err}") from None


def _unsafe_globals(path: Path) -> list[str]:
    """Every import a torch file's pickle asks for that :func:`read_checkpoint` does not admit: torch's own
    scan, or where it stops (pickle protocol 4+, legacy files) the file's opcodes (``pickletools``); nothing
    is loaded or run."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - torch's scan raises on opcodes it does not know
        pass
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # what torch admits; private

        admitted = set(_get_allowed_globals())
    except (ImportError, AttributeError):
        admitted = set()
    admitted |= {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    return [name for name in _pickle_imports(path) if name not in admitted]


def _pickle_imports(path: Path) -> list[str]:
    """``module.name`` of each GLOBAL, STACK_GLOBAL and INST in the pickles of a torch file (zip or legacy)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                streams = [archive.read(member)] if member else []
        else:  # a legacy torch file is pickles from its first byte on (PROTO); text or random bytes are not
            streams = [data] if (data := path.read_bytes()).startswith(b"\x80") else []
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    for data in streams:
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # a legacy file is several pickles in a row
            strings, memo, top = [], {}, None  # strings pushed, the memo's strings, the string on top
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    if "UNICODE" in op.name or op.name.endswith("STRING"):
                        strings.append(top := arg)
                    elif op.name.endswith("GET"):
                        strings.append(top := memo.get(arg, ""))
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = top
                    elif op.name.endswith("PUT"):
                        memo[arg] = top
                    elif op.name not in ("FRAME", "PROTO"):
                        top = None
            except Exception:  # noqa: BLE001 - the rest of the file is tensor data, or garbage
                break
    return list(dict.fromkeys(name.replace("__builtin__.", "builtins.") for name in found))  # protocol 2 names


def recorded_spec(checkpoint: Mapping[str, Any], source: str = "The checkpoint") -> dict[str, Any] | None:
    """The student architecture a checkpoint records (``hyper_parameters.student_spec``), or ``None``.

    Refuses a record that is not ``{"name": str, "kwargs": dict}`` (another program's file, or a crafted one).
    """
    hyper_parameters = checkpoint.get("hyper_parameters")
    spec = hyper_parameters.get(SPEC_KEY) if isinstance(hyper_parameters, Mapping) else None
    if spec is None:
        return None
    if not (
        isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs"), Mapping)
    ):
        raise ValueError(f"{source} records a student_spec that is not {{name, kwargs}}: {str(spec)[:80]!r}")
    return dict(spec)


def extract_state_dict(checkpoint: Mapping[str, Any], prefix: str = STUDENT_PREFIX) -> dict[str, torch.Tensor]:
    """The model's weights from any supported checkpoint layout, with wrapper prefixes removed.

    Handles a ``DistillModule`` checkpoint (``state_dict`` with ``student.`` keys; the teacher is never
    saved there), a plain state_dict, ``{"model": ...}`` / ``{"module": ...}`` containers, and the
    ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and ``model.`` (FrozenTeacher) prefixes.
    """
    state = checkpoint
    for key in _CONTAINER_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    stripped = True
    while stripped and state:
        stripped = False
        for wrapper in _WRAPPER_PREFIXES:
            if all(k.startswith(wrapper) for k in state):
                state = {k[len(wrapper) :]: v for k, v in state.items()}
                stripped = True
    return state


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, arch: str, hint: str = ""
) -> nn.Module:
    """``model.load_state_dict`` that fails with the missing, unexpected and mis-shaped keys named.

    Args:
        model: the freshly built architecture.
        state_dict: weights, already through :func:`extract_state_dict`.
        source: where the weights come from (for the message).
        arch: the architecture that was expected (for the message).
        hint: said at the end of the message.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"

        raise ValueError(
            f"The weights in {source} do not fit the architecture {arch}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mis_shaped)}. "
            f"Build the same architecture that was trained (name, num_classes, in_chans, small_input, ...).{hint}"
        )
    model.load_state_dict(state_dict)
    return model


#: Key of a pruned model's spec that records the integer attributes pruning changed, by module name.
LAYOUT_KEY = "layout"


def shape_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's integer attributes (channel counts, groups, head sizes, ...), by module name.

    Integer tuples come back as lists (the spec is stored in YAML and read with ``weights_only``).
    """

    def shape_like(value: Any) -> bool:
        ints = value if isinstance(value, (tuple, list)) else [value]
        return all(isinstance(v, int) and not isinstance(v, bool) for v in ints)

    return {
        name: {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and shape_like(v)
        }
        for name, m in model.named_modules()
    }


def mark_pruned(model: nn.Module, before: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Record in ``model.model_spec`` that its layer widths now come from its weights, not its arguments.

    A StudentNet needs no mark: its spec lists its widths. Any other model (timm) is rebuilt from
    its spec and then resized to the checkpoint's tensor shapes (:func:`resize_to_state_dict`); the
    integer attributes that pruning changed since ``before`` (:func:`shape_attributes`: a conv's channels,
    an attention layer's ``head_dim``, ...) are recorded under ``layout`` and set again on rebuilding, so no
    model class needs to know about pruning.
    """
    spec = getattr(model, "model_spec", None)
    if spec is None or isinstance(model, StudentNet):
        return
    spec["pruned"] = True
    if before is not None:
        layout = spec.setdefault(LAYOUT_KEY, {})
        for name, attributes in shape_attributes(model).items():
            changed = {k: v for k, v in attributes.items() if before.get(name, {}).get(k, v) != v}
            if changed:
                layout.setdefault(name, {}).update(changed)


def apply_layout(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> None:
    """Set the integer attributes a pruned spec's ``layout`` records (see :func:`mark_pruned`)."""
    for name, attributes in layout.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the recorded pruned layout names a layer {name!r} the architecture lacks") from None
        for key, value in attributes.items():
            current = getattr(module, key, None)
            if not isinstance(current, (int, tuple, list)) or isinstance(current, bool):
                raise ValueError(f"the recorded pruned layout sets {name}.{key}, which is not a size of that layer")
            setattr(module, key, tuple(value) if isinstance(current, tuple) else value)


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give every parameter and buffer of ``model`` the shape of its tensor in ``state_dict`` (a pruned layout).

    Only shapes change (the values are left for ``load_state_dict``), of any module; the standard layers'
    sizes follow (``out_channels``/``in_channels`` and depthwise ``groups`` of convs, ``in/out_features`` of
    linears, ``num_features`` of norms); other sizes come from the spec's recorded ``layout``.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        changed = False
        for attr, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            new = state_dict.get(prefix + attr)
            if new is None or new.shape == tensor.shape:
                continue
            empty = torch.empty(new.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))
            else:
                module._buffers[attr] = empty
            changed = True
        if changed:
            _sync_shape_attributes(module)
    return model


def _sync_shape_attributes(module: nn.Module) -> None:
    """The sizes of the standard layers, from their weights (pruned checkpoints that record no ``layout``)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = weight.shape[0]
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (weight if weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(weight.shape)


def build_student(spec: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Build the architecture a ``{"name", "kwargs"[, "pruned", "layout"]}`` spec describes.

    A pruned non-StudentNet model is resized to the shapes in ``state_dict`` when one is given, and given the
    integer attributes its ``layout`` records (:func:`mark_pruned`).
    """
    try:
        model = create_student(spec["name"], **spec["kwargs"])
    except TypeError as err:  # a spec from another version, or crafted
        raise ValueError(f"the recorded architecture {describe_spec(spec)} cannot be built: {err}") from None
    if spec.get("pruned"):
        mark_pruned(model)
        if state_dict is not None:
            resize_to_state_dict(model, state_dict)
        if LAYOUT_KEY in spec:
            layout = spec[LAYOUT_KEY]
            if not isinstance(layout, Mapping) or not all(isinstance(a, Mapping) for a in layout.values()):
                raise ValueError(f"the recorded architecture {describe_spec(spec)} has a layout that is not by layer")
            apply_layout(model, layout)
            model.model_spec[LAYOUT_KEY] = {name: dict(a) for name, a in layout.items()}
    return model


def save_student(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    data: tuple[str, dict[str, Any]] | None = None,
) -> Path:
    """Save a student alone, in the layout of a ``DistillModule`` checkpoint that :func:`load_student` reads.

    ``data``: the record of the data it was trained on (:func:`recorded_data` of its training checkpoint), kept
    for what reads it (a teacher's check against its data, the metadata of an export)."""
    path = Path(path)
    model_spec(model)  # refuses a model that could not be rebuilt from the file
    if input_shape is not None:
        input_shape = checked_input_shape(input_shape)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder: give save_student a file path (e.g. student.ckpt)")
    state = {STUDENT_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {"hyper_parameters": {}, "state_dict": state}
    record_student(checkpoint, model, input_shape)
    if data is not None:
        _check_classes(model, input_shape, data[1])
        checkpoint[data[0]] = data[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # a failed save leaves the file there as it was
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _check_classes(model: nn.Module, input_shape: list[int] | None, record: Mapping[str, Any]) -> None:
    """Refuse the record of data with other classes than ``model`` has outputs (where ``input_shape`` lets it be
    run): the metadata of the student's export would name the wrong classes."""
    classes = record.get("classes")
    if input_shape is None or not isinstance(classes, (list, tuple)):
        return
    weights = next(model.parameters(), None)
    with torch.no_grad(), eval_mode(model):
        logits = model(torch.zeros(1, *input_shape, device=None if weights is None else weights.device))
    if logits.ndim == 2 and logits.shape[1] != len(classes):
        raise ValueError(f"data= records {len(classes)} classes, and the student has {logits.shape[1]} outputs: "
                         f"give the record of the data it was trained on (its checkpoint's recorded_data)")  # fmt: skip


def checked_input_shape(shape: Any) -> list[int]:
    """``shape`` as ``[channels, height, width]`` of Python ints > 0, else one line saying what it must be (numpy's
    ints kept in a checkpoint would make it unreadable with ``weights_only``)."""
    values = list(shape) if isinstance(shape, (Sequence, np.ndarray)) and not isinstance(shape, str) else []
    if len(values) != 3 or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0
                                   for n in values):  # fmt: skip
        raise ValueError(f"input_shape must be [channels, height, width] of whole numbers > 0 (without the batch), "
                         f"got {shape!r}")  # fmt: skip
    return [int(n) for n in values]


def load_recorded_student(checkpoint: Mapping[str, Any], path: str | Path) -> nn.Module | None:
    """The student ``checkpoint`` (read from ``path``) records, built and with its weights; ``None`` without a spec.

    Its ``trained_on`` holds the record of the data it was trained on (:func:`recorded_data`; ``None`` where the
    file has none)."""
    spec = recorded_spec(checkpoint, f"Checkpoint {str(path)!r}")
    if spec is None:
        return None
    state_dict = extract_state_dict(checkpoint)
    model = load_weights(build_student(spec, state_dict), state_dict, repr(str(path)), describe_spec(spec))
    model.trained_on = recorded_data(checkpoint)  # for checks of the data it is scored on, or teaches on
    return model


@torch.no_grad()
def _take_leading_channels(model: nn.Module, unpruned: nn.Module) -> None:
    """Set each tensor of ``model`` to the leading slice of ``unpruned``'s tensor of that name (non-persistent
    buffers included); a module with a tensor that does not fit is reset by its ``reset_parameters`` instead, and
    refused where it has none (its resized tensors would keep ``torch.empty``'s values)."""
    source = {**dict(unpruned.named_parameters()), **dict(unpruned.named_buffers())}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        if all(_fits(tensor, source.get(prefix + name)) for name, tensor in own.items()):
            for name, tensor in own.items():
                tensor.copy_(source[prefix + name][tuple(slice(0, n) for n in tensor.shape)])
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            raise ValueError(
                f"the layer {module_name!r} of the pruned student cannot be initialised afresh: its tensors are no "
                f"slices of the unpruned model's, and it has no reset_parameters"
            )


def _fits(tensor: torch.Tensor, source: torch.Tensor | None) -> bool:
    return (
        source is not None
        and source.dim() == tensor.dim()
        and all(n <= m for n, m in zip(tensor.shape, source.shape, strict=True))
    )


def load_student(path: str | Path, train: bool = False, from_scratch: bool = False) -> nn.Module:
    """Rebuild a student from a checkpoint written by this project and load its weights.

    The architecture (including a pruned channel layout) comes from the checkpoint's ``student_spec``;
    no callback, teacher or config is needed. The model comes back on the CPU, in eval mode, or in
    train mode with ``train=True`` (to train it further, e.g. as ``model.student`` in a recipe). Its
    ``trained_on`` (:func:`load_recorded_student`) is what ``distill validate|test|predict`` check the data against.

    With ``from_scratch=True`` only the architecture is taken, with freshly initialised weights (to retrain a
    layout found by pruning, Liu et al. 2019): a StudentNet or an unpruned timm model is built new, as its
    constructor initialises it; a pruned timm model takes each tensor from a new unpruned one, as pruning it would
    (its leading channels), so every layer keeps the architecture's own initialisation (timm's zeroed last
    BatchNorm of a residual block included), not PyTorch's defaults.
    """
    if from_scratch:
        checkpoint = read_checkpoint(path)
        spec = recorded_spec(checkpoint, f"Checkpoint {str(path)!r}")
        if spec is not None:
            if not spec.get("pruned"):
                return build_student(spec).train(train)
            unpruned = build_student({k: v for k, v in spec.items() if k not in ("pruned", LAYOUT_KEY)})
            model = build_student(spec, extract_state_dict(checkpoint))  # resized layers hold torch.empty values
            _take_leading_channels(model, unpruned)
            return model.train(train)
    model = load_recorded_student(read_checkpoint(path), path)
    if model is None:
        raise ValueError(
            f"Checkpoint {str(path)!r} records no student_spec, so the architecture is unknown. Its student was "
            f"built without a model_spec (e.g. by timm.create_model: build students with "
            f"students.create_timm_model), or another tool wrote it: teachers.load_teacher(name, "
            f"checkpoint=...).model reads such files."
        )
    return model.train(train)


def is_pruned_from(spec: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """Whether the architecture ``spec`` is ``base``, or ``base`` with channels removed by pruning.

    A StudentNet's spec lists its widths, so each must be at most ``base``'s; any other model must be
    marked pruned. Everything else (name, classes, input channels, ...) must be the same.
    """
    if dict(spec) == dict(base):
        return True
    if spec["name"] != base["name"]:
        return False
    kwargs, base_kwargs = dict(spec["kwargs"]), dict(base["kwargs"])
    if "channels" in kwargs and "channels" in base_kwargs:
        widths, base_widths = kwargs.pop("channels"), base_kwargs.pop("channels")
        narrower = len(widths) == len(base_widths) and all(w <= b for w, b in zip(widths, base_widths, strict=True))
        return narrower and kwargs == base_kwargs
    return bool(spec.get("pruned")) and kwargs == base_kwargs


def describe_spec(spec: Mapping[str, Any]) -> str:
    """``name(arg=value, ...)`` for messages."""
    args = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    return f"{spec['name']}({args})"
