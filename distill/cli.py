"""The ``distill`` command: Lightning's fit/validate/test/predict, plus the project's jobs.

``distill fit --config configs/fmnist/kd.yaml`` runs LightningCLI: the datamodule, the student, the
teacher, the loss and the callbacks are built from typed signatures (``class_path``/``init_args``),
and the data's ``num_classes`` and ``in_chans`` are linked into the student. Jobs that run several
trainings (``quickstart``, ``sweep``, ``prune-distill``) and ``export`` are further subcommands beside them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from distill.module import DistillModule

__all__ = ["JOBS", "DistillCLI", "default_precision", "main"]


class _ArgumentParser(LightningArgumentParser):
    """Lets ``link_arguments`` target the parameters of a factory function used as ``class_path``.

    jsonargparse (4.53) passes its private ``linked_targets`` to ``add_function_arguments``, which does not
    accept it, so linking ``data.num_classes`` into ``students.create_timm_model`` fails. ``linked_targets``
    only relaxes "required" on link targets, and jsonargparse clears those afterwards anyway.
    """

    def add_function_arguments(self, function: Callable, *args: Any, linked_targets: Any = None, **kwargs: Any):
        return super().add_function_arguments(function, *args, **kwargs)


def default_precision() -> str:
    """``bf16-mixed`` where a GPU with bfloat16 is present, else ``32-true`` (CPUs stay float32)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


class DistillCLI(LightningCLI):
    """LightningCLI for :class:`DistillModule` with any datamodule, linking data shape into the student.

    ``trainer.precision`` defaults to :func:`default_precision` (a config or ``--trainer.precision`` wins).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"precision": default_precision()})
        kwargs.setdefault("parser_class", _ArgumentParser)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-running a recipe replaces its run
        super().__init__(DistillModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for attr in ("num_classes", "in_chans"):
            parser.link_arguments(f"data.{attr}", f"model.student.init_args.{attr}", apply_on="instantiate")


def _quickstart(argv: Sequence[str]) -> Any:
    from jsonargparse import CLI

    from distill.quickstart import quickstart

    return CLI(quickstart, args=list(argv), prog="distill quickstart")


def _sweep(argv: Sequence[str]) -> Any:
    from jsonargparse import CLI

    from distill.sweep import sweep

    return CLI(sweep, args=list(argv), prog="distill sweep")


def _prune_distill(argv: Sequence[str]) -> Any:
    from jsonargparse import CLI

    from distill.pipeline import prune_distill

    return CLI(prune_distill, args=list(argv), prog="distill prune-distill")


def _export(argv: Sequence[str]) -> Any:
    from jsonargparse import CLI

    from distill.export import export

    return CLI(export, args=list(argv), prog="distill export")


#: Subcommands beside Lightning's, each a function of its command-line arguments.
JOBS: dict[str, tuple[Callable[[Sequence[str]], Any], str]] = {
    "quickstart": (_quickstart, "the whole job on Fashion-MNIST: teacher, KD student, prune-distill to 100k, table"),
    "sweep": (_sweep, "distill over a grid of temperatures (alphas, seeds); resumable, many workers"),
    "prune-distill": (_prune_distill, "prune and distill the student round by round down to a size target"),
    "export": (_export, "export a (pruned) student checkpoint to ONNX / TorchScript, checked in ONNX Runtime"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``distill`` console script.

    Bad input (a missing file, a wrong class count, an invalid option) ends with one clear message
    and exit status 2; set ``DISTILL_DEBUG=1`` to see the traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # Lightning 2.6 on torch 2.14 warns about its own use of torch's pytree API at every run.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        if args and args[0] in JOBS:
            JOBS[args[0]][0](args[1:])
        elif not args or args[0] in ("-h", "--help"):
            try:
                DistillCLI(args=["--help"])
            except SystemExit:
                print("\nother commands:\n" + "\n".join(f"  {n:<15s}{doc}" for n, (_, doc) in JOBS.items()))
                raise
        else:
            DistillCLI(args=None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    except (ValueError, OSError) as err:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        while err.__cause__ is not None:  # jsonargparse wraps errors raised while building objects
            err = err.__cause__
        print(f"distill: error: {err}\n(set DISTILL_DEBUG=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
