"""int8 students: static post-training quantization in ONNX Runtime, checked by accuracy there.

Static quantization (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference") stores weights as int8 and computes activations' int8 scales from
calibration batches. ONNX Runtime's ``quantize_static`` is the maintained CPU path (``torch.ao``'s eager
quantization is deprecated): the float32 ONNX export is pre-processed (``quant_pre_process``: shape
inference and graph optimisation), calibrated on images of the training split (never the test split),
and written as QDQ (QuantizeLinear/DequantizeLinear around each op, int8 weights and activations) or
QOperator (integer operators) ONNX.

Whether the int8 file is faster depends on the model and the runtime's kernels: measure it
(:func:`distill.latency.compare_latency`, ``benchmarks/latency.py``). Its accuracy is measured here.
Needs the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.batch import as_batch
from distill.rundir import atomic_path

__all__ = ["CALIBRATION_METHODS", "QUANT_FORMATS", "MissingExtra", "QuantOptions", "calibration_images",
           "onnx_accuracy", "quantize_checked", "quantize_onnx", "require_onnxruntime"]  # fmt: skip


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or :class:`MissingExtra` naming the extra to install."""
    try:
        import onnx  # noqa: F401 - the exporter and the quantizer need it too
        import onnxruntime
    except ImportError as err:
        raise MissingExtra(
            f'ONNX export needs the onnx extra ({err.name} is missing): pip install "distill[onnx]" '
            "(onnx, onnxruntime, onnxscript)"
        ) from None
    return onnxruntime


#: ``calibration_method`` names, for ONNX Runtime's ``CalibrationMethod``.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: ``quant_format`` names, for ONNX Runtime's ``QuantFormat``.
QUANT_FORMATS = {"qdq": "QDQ", "qoperator": "QOperator"}


@dataclass(frozen=True)
class QuantOptions:
    """How a student is quantized to int8.

    Args:
        calibration_images: images of the training split that set the activations' scales.
        calibration_method: ``minmax`` (the observed range), ``entropy`` (the range that keeps the
            histogram's KL divergence lowest) or ``percentile`` (the 99.999th percentile of |x|).
        per_channel: one weight scale per output channel (more accurate for pruned and depthwise
            layers) instead of one per tensor.
        quant_format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs: ONNX Runtime fuses them into
            int8 kernels; the portable format) or ``qoperator`` (QLinearConv and friends).
        activations: ``int8`` or ``uint8`` activations (weights are int8). Default: ``int8`` for ``qdq``
            (ONNX Runtime's recommendation; ``uint8`` was about 20% faster on an AVX512-VNNI CPU, but can
            saturate on CPUs without VNNI), ``uint8`` for ``qoperator`` (int8 there ran 6-9x slower).
        max_accuracy_drop: points of validation accuracy the int8 model may lose before a warning.
    """

    calibration_images: int = 512
    calibration_method: str = "minmax"
    per_channel: bool = True
    quant_format: str = "qdq"
    max_accuracy_drop: float = 0.3
    activations: str | None = None

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"Unknown calibration_method {self.calibration_method!r}; "
                f"choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.activations not in (None, "int8", "uint8"):
            raise ValueError(f"activations must be int8 or uint8 (or unset), got {self.activations!r}")
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"Unknown quant_format {self.quant_format!r}; choose one of {', '.join(QUANT_FORMATS)}")
        if self.calibration_images < 1 or not 0 <= self.max_accuracy_drop < math.inf:
            raise ValueError(
                f"need calibration_images >= 1 and a finite max_accuracy_drop >= 0 (points); got "
                f"{self.calibration_images} and {self.max_accuracy_drop}"
            )

    @property
    def activation_type(self) -> str:
        """``int8`` or ``uint8``: ``activations``, or the default for ``quant_format``."""
        return self.activations or ("uint8" if self.quant_format == "qoperator" else "int8")


def quantize_onnx(
    float_path: str | Path,
    int8_path: str | Path,
    calibration: Iterable[torch.Tensor | np.ndarray],
    options: QuantOptions | None = None,
) -> Path:
    """Quantize the float32 ONNX file ``float_path`` to ``int8_path``, calibrated on ``calibration``'s batches.

    Raises:
        ValueError: in one line, when ONNX Runtime cannot quantize the model, or ``calibration`` is empty.
    """
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = options or QuantOptions()
    float_path, int8_path = Path(float_path), Path(int8_path)
    if int8_path.resolve() == float_path.resolve():
        raise ValueError(f"The int8 file would replace the float32 one ({float_path}): give it a name of its own, e.g. "
                         f"{float_path.with_suffix('.int8.onnx')}")  # fmt: skip
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("no calibration images: the calibration split is empty")

    class Reader(CalibrationDataReader):
        def __init__(self, name: str, takes: list[int | None] | None) -> None:
            self.name = name
            self.batches = (b if b is checked else _fitting(b, takes, float_path) for b in [checked, *batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {self.name: batch}

    import onnx

    with tempfile.TemporaryDirectory() as tmp, atomic_path(int8_path) as partial:
        try:
            graph_input = onnx.load(str(float_path), load_external_data=False).graph.input[0]
            tensor = graph_input.type.tensor_type  # its dims: a number, or None where any size goes (the batch)
            takes = [d.dim_value or None for d in tensor.shape.dim] if tensor.HasField("shape") else None
            checked = _fitting(first, takes, float_path)  # before ONNX Runtime prepares anything
            reader = Reader(graph_input.name, takes)
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared))
            with contextlib.redirect_stdout(io.StringIO()):  # the entropy and percentile calibrators print
                quantize_static(
                    str(prepared),
                    str(partial),
                    reader,
                    quant_format=getattr(QuantFormat, QUANT_FORMATS[options.quant_format]),
                    per_channel=options.per_channel,
                    activation_type=QuantType.QUInt8 if options.activation_type == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[options.calibration_method]),
                )
        except _WrongShape as err:
            raise ValueError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - onnx and ONNX Runtime raise many kinds; all mean "cannot quantize"
            message = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"ONNX Runtime cannot quantize {float_path}: {type(err).__name__}: {message}. Check that the "
                f"calibration images fit the model's input (the recipe's data), or ship the float32 model (its ONNX "
                f"file: distill export --onnx)"
            ) from None
    return int8_path


class _WrongShape(ValueError):
    """Calibration batches that do not fit the model's input (found before ONNX Runtime names an index)."""


def _fitting(batch: torch.Tensor | np.ndarray, takes: list[int | None] | None, path: Path) -> np.ndarray:
    """``batch`` as the contiguous float32 array ONNX Runtime reads, once checked to fit the input dims ``takes``
    of the model at ``path`` (``None``: unknown)."""
    array = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
    given = list(array.shape)
    if not array.size:  # calibrated on it, the model gave the same logits for every input
        raise _WrongShape(f"a calibration batch holds no images (its shape is {tuple(given)}): give batches of images")
    if takes is None or (len(given) == len(takes) and all(t in (None, g) for t, g in zip(takes, given, strict=True))):
        return array
    shown = ["x".join("N" if n is None else str(n) for n in dims) or "a single number" for dims in (given, takes)]
    if len(given) == len(takes) and given[1:] == takes[1:]:  # the images fit; a fixed batch size does not
        fix = f"give batches of {takes[0]} images (or export it with a dynamic batch size, as distill export does)"
    else:
        fix = "give images of its input size (the data it was trained on)"
    raise _WrongShape(f"calibration batches are {shown[0]}, but {path} takes {shown[1]} inputs: {fix}")


def calibration_images(datamodule: Any, num_images: int) -> list[torch.Tensor]:
    """The first ``num_images`` images of ``datamodule``'s training split, shuffled with seed 0, in batches.

    The datamodule should be built without augmentation (:func:`distill.recipes.build_datamodule`). The
    caller's random state is left as it was.
    """
    datamodule.setup("fit")
    images, left = [], num_images
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for raw in datamodule.train_dataloader():
            images.append(as_batch(raw).x.cpu()[:left])
            left -= len(images[-1])
            if left <= 0:
                break
    return images


def onnx_accuracy(path: str | Path, batches: Iterable[Any], threads: int | None = None) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` in ONNX Runtime's CPU provider, over ``batches``."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for raw in batches:
        batch = as_batch(raw)
        logits = session.run(None, {name: batch.x.cpu().numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(1) == batch.y.cpu().numpy()).sum())
        total += len(batch.y)
    if total == 0:
        raise ValueError(f"no images to measure the accuracy of {path} on")
    return correct / total


def quantize_checked(
    float_path: str | Path,
    int8_path: str | Path,
    datamodule: Any,
    options: QuantOptions | None = None,
    splits: Iterable[str] = ("val",),
    limit_batches: dict[str, int | float | None] | None = None,
) -> dict[str, Any]:
    """Quantize ``float_path`` calibrated on ``datamodule``'s training split, and measure both files.

    Returns:
        ``float_bytes``, ``int8_bytes``, and for each split in ``splits`` (``val``, ``test``) the accuracy of
        the float32 and int8 models in ONNX Runtime, as ``float_<split>_acc`` and ``int8_<split>_acc``;
        over the batches that ``limit_batches[split]`` keeps, read as Lightning's ``limit_val_batches``
        (an int: a count, a float: a fraction) so that they are the ones the checkpoint was measured on.
    """
    options = options or QuantOptions()
    quantize_onnx(float_path, int8_path, calibration_images(datamodule, options.calibration_images), options)
    result: dict[str, Any] = {"float_bytes": Path(float_path).stat().st_size}
    result["int8_bytes"] = Path(int8_path).stat().st_size
    for split in splits:
        datamodule.setup("fit" if split == "val" else "test")
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        limit = (limit_batches or {}).get(split)
        if isinstance(limit, float):
            limit = None if limit >= 1.0 else int(len(loader) * limit)
        for kind, path in (("float", float_path), ("int8", int8_path)):
            result[f"{kind}_{split}_acc"] = onnx_accuracy(path, itertools.islice(loader, limit))
    return result
