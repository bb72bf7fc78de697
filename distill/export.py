"""Export a (pruned) student to the files it is deployed as, each checked against the checkpoint.

- ONNX goes through ``torch.onnx.export`` (the ``torch.export``-based exporter) with a dynamic batch
  dimension, then runs in ONNX Runtime on the CPU: the export only counts if its outputs match
  PyTorch's within ``atol``.
- int8 ONNX: that file quantized by ONNX Runtime (:mod:`distill.quantize`), calibrated on the recipe's
  training split; its validation accuracy is measured beside float32's, in ONNX Runtime.
- ``.pt2``: a ``torch.export`` ExportedProgram (dynamic batch), reloaded with ``torch.export.load``
  and compared like ONNX: the PyTorch-side file for ``torch.compile``, AOTInductor and ExecuTorch.
- TorchScript (``torch.jit.trace``) is deprecated in torch 2.14; it is kept for LibTorch C++ users.

ONNX needs the ``onnx`` extra (``pip install "distill[onnx]"``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data.base import check_trained_data
from distill.profile import activation_floor, check_runs_on
from distill.quantize import CALIBRATION_METHODS, QuantOptions, quantize_checked, require_onnxruntime
from distill.recipes import build_datamodule, load_recipe
from distill.rundir import atomic_path, check_output
from students.checkpoint import INPUT_SHAPE_KEY, load_student, read_checkpoint, recorded_data, recorded_input_shape
from students.modes import eval_mode

__all__ = ["CHECK_IMAGES", "deployment_metadata", "export", "export_onnx", "export_pt2", "export_torchscript"]

#: Each exported file is checked on a batch of so many random images against PyTorch.
CHECK_IMAGES = 3


def deployment_metadata(trained_on: tuple[str, Mapping[str, Any]] | None, input_shape: Sequence[int]) -> dict[str, str]:
    """What a shipped file must say to be fed and read: the ``input_size`` ``[channels, height, width]``, and, as
    the record of the data it was trained on says (:func:`students.checkpoint.recorded_data`; ``None``: not known),
    how an image was made that size (``interpolation``, ``crop_pct``: see
    :meth:`~distill.data.base.SplitDataModule.model_inputs`), the ``mean`` and ``std`` each channel is normalised
    with and the class names in the order of the outputs (``label_names``); named as in timm's ``pretrained_cfg``,
    each as JSON (ONNX model metadata is strings)."""
    _, record = trained_on or (None, {})
    inputs = record.get("inputs") or {}
    said = {"input_size": list(input_shape), **{k: inputs.get(k) for k in ("interpolation", "crop_pct", "mean", "std")},
            "label_names": record.get("classes")}  # fmt: skip
    return {key: json.dumps(value) for key, value in said.items() if value is not None}


def on_the_cpu(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it on the CPU: ``.cpu()`` moves a module in place, and an export left the caller's
    model (a student training on the GPU) on the CPU."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return model if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(model).cpu()


def _ready_to_export(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    example: str,
    metadata: Mapping[str, str] | None = None,
) -> tuple[nn.Module, torch.Tensor, Path]:
    """``path`` checked to be one a file may replace (not a folder, a device, or a run's checkpoint or record:
    :func:`~distill.rundir.check_output`, whose line suggests ``example``), ``model`` and ``example_input`` on the
    CPU (:func:`on_the_cpu`), the input checked to run (else an error deep in the exporter, "Failed to export the
    model", blamed the model) and the ``metadata`` to describe them, then the folder of ``path`` made."""
    check_output(path, "path", {}, example)
    model = on_the_cpu(model)
    x = example_input.cpu()
    logits = check_runs_on(model, x[:1])
    if metadata:
        _check_metadata(metadata, logits, x)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return model, x, Path(path)


def _check_metadata(metadata: Mapping[str, str], logits: torch.Tensor, x: torch.Tensor) -> None:
    """Refuse metadata (:func:`deployment_metadata`) that does not describe the model that gave ``logits`` for ``x``
    (its first image): a file whose ``label_names`` are not one per output, or whose ``mean`` and ``std`` are not one
    per channel, is read wrongly by whoever deploys it, without an error."""
    said = {}
    for key in ("input_size", "mean", "std", "label_names"):
        if key in metadata:
            try:
                said[key] = json.loads(metadata[key])
            except (TypeError, json.JSONDecodeError):
                raise ValueError(f"metadata[{key!r}] must be a JSON string, as deployment_metadata makes it; got "
                                 f"{metadata[key]!r}") from None  # fmt: skip
    channels, wrong = x.shape[1], []
    if "input_size" in said and said["input_size"] != list(x.shape[1:]):
        wrong.append(f"input_size {said['input_size']} is not the example input's {list(x.shape[1:])}")
    for key in ("mean", "std"):  # one value for every channel broadcasts, as Normalize does
        if key in said and not (isinstance(said[key], list) and len(said[key]) in (1, channels)):
            wrong.append(f"{key} {said[key]} is not one value per input channel ({channels})")
    if (
        "label_names" in said
        and logits.ndim == 2
        and not (isinstance(said["label_names"], list) and len(said["label_names"]) == logits.shape[1])
    ):
        wrong.append(f"label_names {said['label_names']} is not one name per output ({logits.shape[1]})")
    if wrong:
        raise ValueError(
            f"The metadata does not describe the model: {'; '.join(wrong)}. Give the metadata of the data it was "
            f"trained on: deployment_metadata(model.trained_on, input_shape)"
        )


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    atol: float = 1e-4,
    metadata: Mapping[str, str] | None = None,
) -> float:
    """Write ``model`` to ``path`` as ONNX (dynamic batch) and check it in ONNX Runtime.

    ``metadata`` (:func:`deployment_metadata`) goes into the file's model metadata, which ONNX Runtime gives back
    as ``InferenceSession(path).get_modelmeta().custom_metadata_map``.

    Returns:
        The largest absolute difference between ONNX Runtime's and PyTorch's logits, on a batch of
        ``CHECK_IMAGES`` random inputs shaped like ``example_input``.

    Raises:
        ValueError: if that difference exceeds ``atol``.
    """
    ort = require_onnxruntime()
    model, x, path = _ready_to_export(model, example_input, path, "student.onnx", metadata)
    two = x[:1].expand(2, *x.shape[1:])  # a batch of 1 would be specialised (ConvNeXt, LeViT, EfficientViT)
    with eval_mode(model), atomic_path(path) as partial:  # written only once it passed the check
        torch.onnx.export(
            model,
            (two,),
            str(partial),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            dynamo=True,
            external_data=False,  # one self-contained file (students are small)
            verbose=False,
        )
        if metadata:
            import onnx

            proto = onnx.load(str(partial))
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
            onnx.save(proto, str(partial))
        check = torch.randn(CHECK_IMAGES, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        expected = model(check).numpy()
        session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
        diff = float(abs(got - expected).max())
        if diff > atol:
            raise ValueError(f"ONNX Runtime's outputs differ from PyTorch's by {diff:.2e} > {atol:g} ({path})")
    return diff


@torch.no_grad()
def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | Path, atol: float = 1e-4) -> float:
    """Trace ``model`` to TorchScript at ``path``, reload it, and return its largest difference from PyTorch."""
    model, x, path = _ready_to_export(model, example_input, path, "student.pt")
    with eval_mode(model), atomic_path(path) as partial, warnings.catch_warnings():  # deprecation said once, above
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
        traced.save(str(partial))
        check = torch.randn(CHECK_IMAGES, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        diff = float((torch.jit.load(str(partial))(check) - model(check)).abs().max())
        if diff > atol:
            raise ValueError(
                f"The TorchScript module's outputs differ from PyTorch's by {diff:.2e} > {atol:g} ({path})"
            )
    return diff


@torch.no_grad()
def export_pt2(model: nn.Module, example_input: torch.Tensor, path: str | Path, atol: float = 1e-4) -> float:
    """Write ``model`` as a ``torch.export`` ExportedProgram (dynamic batch) at ``path``, reload it, compare.

    Returns:
        The largest absolute difference between the reloaded program's logits and the module's.
    """
    model, x, path = _ready_to_export(model, example_input, path, "student.pt2")
    with eval_mode(model), atomic_path(path) as partial, tempfile.TemporaryDirectory() as tmp:
        two = x[:1].expand(2, *x.shape[1:])  # a batch of 1 would be specialised to the constant 1
        program = torch.export.export(model, (two,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        file = Path(tmp) / "student.pt2"  # torch.export.load wants the .pt2 suffix
        torch.export.save(program, str(file))
        check = torch.randn(CHECK_IMAGES, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        diff = float((torch.export.load(str(file)).module()(check) - model(check)).abs().max())
        if diff > atol:
            raise ValueError(f"The exported program's outputs differ from PyTorch's by {diff:.2e} > {atol:g} ({path})")
        shutil.copyfile(file, partial)  # written only once it passed the check
    return diff


def export(
    checkpoint: str,
    onnx: str | None = None,
    int8: str | None = None,
    pt2: str | None = None,
    torchscript: str | None = None,
    input_size: int | None = None,
    atol: float = 1e-4,
    recipe: str | None = None,
    calibration_images: int = 512,
    calibration_method: str = "minmax",
    per_channel: bool = True,
    quant_format: str = "qdq",
    activations: str | None = None,
    max_accuracy_drop: float = 0.3,
) -> dict[str, Any]:
    """Export a checkpoint's student (pruned or not) to ONNX, int8 ONNX, .pt2 or TorchScript, each file checked.

    Give at least one of ``onnx``, ``int8``, ``pt2`` and ``torchscript``; each file is checked against the student.

    Args:
        checkpoint: a checkpoint written by ``distill fit`` / ``distill prune-distill``.
        onnx: where to write the float32 ONNX file.
        int8: where to write the int8 ONNX file (static quantization in ONNX Runtime, calibrated on the
            training split of the recipe's data; its validation accuracy is printed beside float32's).
        pt2: where to write the ``torch.export`` ExportedProgram (``.pt2``, reloaded by ``torch.export.load``).
        torchscript: where to write a TorchScript file (deprecated by PyTorch; for LibTorch C++ users).
        input_size: side of the square input images (default: the size recorded in the checkpoint).
        atol: largest allowed difference between an exported float model's logits and PyTorch's.
        recipe: for ``int8``: the recipe (``distill fit`` config) whose ``data`` section gives the calibration
            and validation images (default: the ``config.yaml`` Lightning saved beside the checkpoint).
            Augmentation is turned off.
        calibration_images: for ``int8``: training images that set the activations' scales.
        calibration_method: for ``int8``: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: for ``int8``: one weight scale per output channel (else per tensor).
        quant_format: for ``int8``: ``qdq`` (QuantizeLinear/DequantizeLinear pairs) or ``qoperator``.
        activations: for ``int8``: ``int8`` or ``uint8`` activations (default: int8 for qdq, uint8 for
            qoperator; see :class:`distill.quantize.QuantOptions`).
        max_accuracy_drop: for ``int8``: warn when the int8 model loses more validation accuracy (points).

    Returns:
        For each float format written, the largest difference from PyTorch; for ``int8``, the file sizes
        and the validation accuracies (``int8``: :func:`distill.quantize.quantize_checked`'s result).
    """
    asked = {"onnx": onnx, "int8": int8, "pt2": pt2, "torchscript": torchscript}
    if all(p is None for p in asked.values()):
        raise ValueError("Nothing to export: give a file name to onnx, int8, pt2 or torchscript (e.g. --onnx s.onnx)")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be a positive number of pixels, got {input_size}")
    if not 0 <= atol < math.inf:
        raise ValueError(f"atol must be a finite number >= 0, got {atol}")
    options = QuantOptions(calibration_images, calibration_method, per_channel, quant_format, max_accuracy_drop,
                           activations)  # fmt: skip
    if int8 is None and (recipe is not None or options != QuantOptions()):
        raise ValueError(
            "recipe and the calibration options only apply to int8: add int8=<file.int8.onnx> (--int8), or drop them"
        )
    outputs = {fmt: Path(p) for fmt, p in asked.items() if p is not None}
    recipe_path = (Path(recipe) if recipe else Path(checkpoint).parent / "config.yaml") if int8 is not None else None
    _check_outputs(Path(checkpoint), outputs, recipe_path)
    if onnx is not None or int8 is not None:
        require_onnxruntime()
    datamodule = None
    if recipe_path is not None:  # int8: the data is found before anything is written
        if recipe is None and not recipe_path.is_file():
            raise ValueError(
                f"int8 needs calibration images: no config.yaml beside {checkpoint}; pass recipe=<the distill fit "
                f"config> (e.g. --recipe configs/fmnist/kd.yaml)"
            )
        where = str(recipe_path) if recipe else f"{recipe_path} (give --recipe to calibrate on data elsewhere)"
        datamodule = build_datamodule(load_recipe(recipe_path), where)
    checkpoint_data = read_checkpoint(checkpoint)
    trained_on = recorded_data(checkpoint_data)
    if trained_on is not None and datamodule is not None:
        check_trained_data(str(checkpoint), trained_on, datamodule, "int8 would be calibrated and scored on the "
                           "wrong images. Give --recipe a config of the data it was trained on.")  # fmt: skip
    model = load_student(checkpoint)
    recorded = checkpoint_data.get(INPUT_SHAPE_KEY)  # as it is: a record input_size stands in for may be odd
    if input_size is not None:
        in_chans = model.model_spec["kwargs"].get("in_chans", 3) if hasattr(model, "model_spec") else 3
        shape = [in_chans, input_size, input_size]
        if isinstance(recorded, list) and len(recorded) == 3 and recorded[1:] != shape[1:]:  # a choice, at a cost
            print(f"warning: {checkpoint} was trained on {'x'.join(map(str, recorded[1:]))} images; the files take "
                  f"{input_size}x{input_size} (their metadata says so): scores at another size are not its own",
                  file=sys.stderr)  # fmt: skip
    else:
        shape = recorded_input_shape(checkpoint_data, str(checkpoint))
    if shape is None:
        raise ValueError(f"{checkpoint} records no input size: pass input_size (e.g. 28 for Fashion-MNIST)")
    if datamodule is not None:
        _check_calibration_shape(datamodule, shape, str(recipe_path), sized=input_size is not None)
    trained = "an unrecorded size" if recorded is None else recorded
    _check_memory(model, shape, trained)
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    except RuntimeError as err:
        raise ValueError(
            f"The student cannot run on {tuple(shape)} inputs ({str(err).splitlines()[0]}). Give an input_size it "
            f"accepts (it was trained on {trained})."
        ) from None
    if torchscript is not None:
        print("warning: TorchScript is deprecated by PyTorch (torch.jit.trace); prefer pt2= (torch.export)",
              file=sys.stderr)  # fmt: skip
    if trained_on is None and ("onnx" in outputs or "int8" in outputs):
        print(f"warning: {checkpoint} records no data it was trained on, so the ONNX file does not say its mean, "
              f"std, label_names, which whoever deploys it must know (README's classify.py reads them): export "
              f"the checkpoint `distill fit` wrote, or save the student with data= (students.save_student)",
              file=sys.stderr)  # fmt: skip
    created = sorted({p for out in outputs.values() for p in out.resolve().parents if not p.exists()}, reverse=True)
    results: dict[str, Any] = {}
    # Every file is written and checked under a staged name beside its target, and all are renamed into place
    # only once every one passed: a failure leaves the earlier files (and folders) as they were.
    staged = {fmt: path.with_name(f".{path.name}.staged") for fmt, path in outputs.items()}
    float_onnx = None
    try:
        for path in outputs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            float_onnx = staged.get("onnx", Path(tmp) / "student.onnx")
            if "onnx" in outputs or "int8" in outputs:
                metadata = deployment_metadata(trained_on, shape)
                results["onnx"] = export_onnx(model, example, float_onnx, atol, metadata)
            if "int8" in outputs:
                results["int8"] = quantize_checked(float_onnx, staged["int8"], datamodule, options)
        if "pt2" in outputs:
            results["pt2"] = export_pt2(model, example, staged["pt2"], atol)
        if "torchscript" in outputs:
            results["torchscript"] = export_torchscript(model, example, staged["torchscript"], atol)
        for fmt, path in outputs.items():
            staged[fmt].replace(path)
    except BaseException as err:
        for path in staged.values():
            path.unlink(missing_ok=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, ValueError):  # name the files the user asked for, not their staged names
            message = str(err)
            for fmt, path in staged.items():
                message = message.replace(str(path), str(outputs[fmt]))
            if float_onnx is not None and "onnx" not in outputs:  # int8 only: its float32 file is a temporary one
                message = message.replace(str(float_onnx), f"the float32 ONNX export of {checkpoint}")
            raise ValueError(message) from None
        raise
    if "onnx" not in outputs:
        results.pop("onnx", None)
    for fmt, result in results.items():
        if fmt == "int8":
            print(int8_line(outputs["int8"], result, options))
        else:
            print(f"{fmt}: {outputs[fmt]} (max |difference| from PyTorch: {result:.2e})")
    return results


def _check_memory(model: nn.Module, shape: list[int], trained: Any) -> None:
    """Refuse, in one line, an input size at which checking the exported files cannot fit in this machine's memory
    (the kernel would kill the process without a word), before anything runs at that size."""
    need, free = activation_floor(model, (CHECK_IMAGES, *shape)), _available_memory()
    if need is not None and free is not None and need > free:
        raise ValueError(
            f"At {'x'.join(map(str, shape[1:]))} pixels, checking the exported student on {CHECK_IMAGES} images "
            f"holds at least {need / 2**30:.1f} GiB of activations, more than the {free / 2**30:.1f} GiB of memory "
            f"available here: give a smaller input_size (it was trained on {trained})"
        )


def _available_memory() -> int | None:
    """Bytes of memory available to a new process (``MemAvailable`` of ``/proc/meminfo``), where the system says."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _check_calibration_shape(datamodule: Any, shape: list[int], where: str, sized: bool) -> None:
    """Refuse int8 calibration images of another shape than the exported student's input (``shape``; ``sized``:
    given as ``input_size``), in one line naming the fix, before anything is exported (ONNX Runtime would fail on
    them, naming an index)."""
    size = getattr(datamodule, "model_inputs", dict)().get("size")
    images = [getattr(datamodule, "in_chans", None), *(size or [])]
    if None in images or len(images) != 3 or images == list(shape):
        return
    data, exported = "x".join(map(str, images)), "x".join(map(str, shape))
    if images[0] != shape[0]:
        fix = "give --recipe a config of the data it was trained on"
    elif sized:  # the recipe's data may well be right: the size asked for is not theirs
        fix = f"export it at that data's size (--input_size {images[1]}), or give --recipe data of {exported} images"
    else:
        fix = (f"give --recipe a config of the data it was trained on, or --input_size {images[1]} to export it for "
               f"that data's size")  # fmt: skip
    raise ValueError(f"int8 calibration images would be {data} ({where}), and the student is exported for {exported} "
                     f"inputs: {fix}")  # fmt: skip


def int8_line(path: Path, result: dict[str, Any], options: QuantOptions) -> str:
    """One line on an int8 file: its size against float32's, and its validation accuracy against float32's.

    A drop over ``options.max_accuracy_drop`` points is also printed as a warning on stderr.
    """
    drop = 100 * (result["float_val_acc"] - result["int8_val_acc"])
    if drop > options.max_accuracy_drop:
        others = " or ".join(m for m in CALIBRATION_METHODS if m != options.calibration_method)
        print(
            f"warning: the int8 model loses {drop:.2f} points of validation accuracy (more than max_accuracy_drop="
            f"{options.max_accuracy_drop:g}): try calibration_method={others}, more calibration_images, or ship "
            f"float32",
            file=sys.stderr,
        )
    return (
        f"int8: {path} ({result['int8_bytes'] / 1024:.0f} KiB, {result['float_bytes'] / result['int8_bytes']:.1f}x "
        f"smaller than float32); validation accuracy in ONNX Runtime: float32 {result['float_val_acc']:.4f}, "
        f"int8 {result['int8_val_acc']:.4f} ({-drop:+.2f} points)"
    )


def _check_outputs(checkpoint: Path, outputs: dict[str, Path], recipe: Path | None) -> None:
    """Refuse output paths that would overwrite the checkpoint, the recipe or each other, or cannot be written."""
    seen: dict[Path, str] = {}
    for fmt, path in outputs.items():
        if path.resolve() in seen:
            raise ValueError(f"{seen[path.resolve()]} and {fmt} name the same file {path}: give each its own")
        seen[path.resolve()] = fmt
    inputs = {"the checkpoint being exported": checkpoint, "the recipe int8 calibrates on": recipe}
    for fmt, path in outputs.items():
        name = {"onnx": "student.onnx", "int8": "student.int8.onnx", "pt2": "student.pt2"}.get(fmt, "student.pt")
        check_output(path, fmt, inputs, name)
        folder = next(p for p in path.resolve().parents if p.exists())  # the missing ones are created
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise ValueError(f"{fmt}={str(path)!r} cannot be written: {folder}: {err.strerror}") from None
