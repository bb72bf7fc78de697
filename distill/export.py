"""Export a (pruned) student to ONNX and TorchScript, checked against a runtime that is not PyTorch.

ONNX goes through ``torch.onnx.export`` (the ``torch.export``-based exporter) with a dynamic batch
dimension, then runs in ONNX Runtime on the CPU: the export only counts if its outputs match
PyTorch's within ``atol``. TorchScript (``torch.jit.trace``; deprecated in recent PyTorch, still the
format LibTorch C++ loads) is reloaded and compared the same way. Needs the ``onnx`` extra
(``pip install "distill[onnx]"``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.profile import eval_mode
from distill.rundir import atomic_path
from students.checkpoint import INPUT_SHAPE_KEY, load_student, read_checkpoint, recorded_input_shape

__all__ = ["export", "export_onnx", "export_torchscript"]


def _require_onnx() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            'ONNX export needs the onnx extra: pip install "distill[onnx]" (onnx, onnxruntime, onnxscript)'
        ) from None
    return onnxruntime


@torch.no_grad()
def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, atol: float = 1e-4) -> float:
    """Write ``model`` to ``path`` as ONNX (dynamic batch) and check it in ONNX Runtime.

    Returns:
        The largest absolute difference between ONNX Runtime's and PyTorch's logits, on a batch of
        3 random inputs shaped like ``example_input``.

    Raises:
        ValueError: if that difference exceeds ``atol``.
    """
    ort = _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    x = example_input.cpu()
    with eval_mode(model), atomic_path(path) as partial:  # written only once it passed the check
        torch.onnx.export(
            model,
            (x,),
            str(partial),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            dynamo=True,
            external_data=False,  # one self-contained file (students are small)
            verbose=False,
        )
        check = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    x = example_input.cpu()
    with eval_mode(model), atomic_path(path) as partial:  # written only once it passed the check
        traced = torch.jit.trace(model, x)
        traced.save(str(partial))
        check = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        diff = float((torch.jit.load(str(partial))(check) - model(check)).abs().max())
        if diff > atol:
            raise ValueError(
                f"The TorchScript module's outputs differ from PyTorch's by {diff:.2e} > {atol:g} ({path})"
            )
    return diff


def export(
    checkpoint: str,
    onnx: str | None = None,
    torchscript: str | None = None,
    input_size: int | None = None,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Export the student of a ``distill`` checkpoint (pruned or not) to ONNX and/or TorchScript.

    Args:
        checkpoint: a checkpoint written by ``distill fit`` / ``distill prune-distill``.
        onnx: where to write the ONNX file.
        torchscript: where to write the TorchScript file.
        input_size: side of the square input images (default: the size recorded in the checkpoint).
        atol: largest allowed difference between the exported model's logits and PyTorch's.

    Returns:
        The measured largest difference for each written format.
    """
    if onnx is None and torchscript is None:
        raise ValueError("Nothing to export: give onnx=<file.onnx> and/or torchscript=<file.pt>")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be a positive number of pixels, got {input_size}")
    if not 0 <= atol < math.inf:
        raise ValueError(f"atol must be a finite number >= 0, got {atol}")
    outputs = {fmt: Path(p) for fmt, p in (("onnx", onnx), ("torchscript", torchscript)) if p is not None}
    _check_outputs(Path(checkpoint), outputs)
    checkpoint_data = read_checkpoint(checkpoint)
    model = load_student(checkpoint)
    if input_size is not None:
        in_chans = model.model_spec["kwargs"].get("in_chans", 3) if hasattr(model, "model_spec") else 3
        shape = [in_chans, input_size, input_size]
    else:
        shape = recorded_input_shape(checkpoint_data, str(checkpoint))
    if shape is None:
        raise ValueError(f"{checkpoint} records no input size: pass input_size (e.g. 28 for Fashion-MNIST)")
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    except RuntimeError as err:
        raise ValueError(
            f"The student cannot run on {tuple(shape)} inputs ({str(err).splitlines()[0]}). Give an input_size it "
            f"accepts (it was trained on {checkpoint_data.get(INPUT_SHAPE_KEY, 'an unrecorded size')})."
        ) from None
    created = sorted({p for out in outputs.values() for p in out.resolve().parents if not p.exists()}, reverse=True)
    diffs = {}
    try:
        if "onnx" in outputs:
            diffs["onnx"] = export_onnx(model, example, outputs["onnx"], atol)
        if "torchscript" in outputs:
            diffs["torchscript"] = export_torchscript(model, example, outputs["torchscript"], atol)
    except BaseException:
        for folder in created:  # deepest first: a failed export leaves no folder it made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for fmt, diff in diffs.items():
        print(f"{fmt}: {outputs[fmt]} (max |difference| from PyTorch: {diff:.2e})")
    return diffs


def _check_outputs(checkpoint: Path, outputs: dict[str, Path]) -> None:
    """Refuse output paths that would overwrite the checkpoint or each other, or cannot be written."""
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise ValueError(f"onnx and torchscript name the same file {outputs['onnx']}: give each its own")
    for fmt, path in outputs.items():
        if path.resolve() == checkpoint.resolve():
            raise ValueError(f"{fmt}={str(path)!r} is the checkpoint being exported; it would be overwritten")
        if path.is_dir():
            example = path / ("student.onnx" if fmt == "onnx" else "student.pt")
            raise ValueError(f"{fmt}={str(path)!r} is a folder: give a file name, e.g. {example}")
        folder = next(p for p in path.resolve().parents if p.exists())  # the missing ones are created
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise ValueError(f"{fmt}={str(path)!r} cannot be written: {folder}: {err.strerror}") from None
