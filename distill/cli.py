"""The ``distill`` command: Lightning's fit/validate/test/predict, plus the project's jobs.

``distill fit --config configs/fmnist/kd.yaml`` runs :class:`~distill.lightning_cli.DistillCLI`. Jobs
that run several trainings (``quickstart``, ``sweep``, ``prune-distill``) and ``export`` are
subcommands beside Lightning's: each is a function whose signature and docstring jsonargparse turns
into options and ``--help``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from jsonargparse import CLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from distill.export import export
from distill.lightning_cli import DistillCLI, JobParser, stop_if_terminated, stop_on_sigterm
from distill.prune_distill import prune_distill
from distill.quantize import MissingExtra
from distill.quickstart import quickstart
from distill.rundir import IncompleteRun
from distill.sweep import sweep

__all__ = ["JOBS", "main", "one_line", "run_job"]

#: Subcommands beside Lightning's: the function each runs, and its line in ``distill --help``.
JOBS: dict[str, tuple[Callable[..., Any], str]] = {
    "quickstart": (
        quickstart,
        "the whole job on Fashion-MNIST: teacher, KD student, prune-distill to a latency, table",
    ),
    "sweep": (sweep, "distill over a grid of losses, temperatures (alphas, seeds); resumable, many workers"),
    "prune-distill": (prune_distill, "prune and distill the student round by round down to a size or latency target"),
    "export": (export, "export a (pruned) student to ONNX, int8 ONNX, .pt2, TorchScript; each checked against it"),
}


def run_job(name: str, argv: Sequence[str]) -> Any:
    """Run the job ``name`` with its command-line arguments (options from its signature, help from its docstring)."""
    own = "a YAML file of this command's own options, as --print_config writes them"
    return CLI(JOBS[name][0], args=list(argv), prog=f"distill {name}", parser_class=JobParser, config_help=own)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``distill`` console script.

    Bad input (a missing file, a wrong class count, an invalid option) ends with one clear message
    and exit status 2, a job that ended with work unfinished (a sweep whose other workers still run) with
    status 3, a run stopped by SIGTERM (``kill``, ``timeout``, a scheduler) with 143 (Lightning ends it with
    status 0) and by Ctrl-C with 130 (Lightning: 1), each with a line saying how to resume; set ``DISTILL_DEBUG=1``
    to see the traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    # Lightning 2.6 on torch 2.14 warns about its own use of torch's pytree API at every run.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # `distill --help`
    # At every first fit (config.yaml is written there before): a fit into an earlier run's folder is checked here
    # (Lightning's version counter refused, the earlier records put back if it fails before its first checkpoint).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    pressed = threading.Event()
    try:
        with stop_on_sigterm(), _noting_ctrl_c(pressed):
            _run(args, argv)
            stop_if_terminated(None)  # a SIGTERM raised where Python ignores it (a __del__) stops the job here
    except SIGTERMException:  # Lightning stopped the run cleanly (checkpoints, logs) and exits with 0
        _stopped(command)
    except KeyboardInterrupt:  # Ctrl-C outside a Trainer run (an export, a timing, a job between its runs)
        _stopped(command, "Ctrl-C (SIGINT)", 130)
    except SystemExit as stop:  # Ctrl-C in a Trainer run: Lightning shuts it down and exits with 1
        if stop.code == 1 and pressed.is_set():
            _stopped(command, "Ctrl-C (SIGINT)", 130)
        raise
    except (ValueError, OSError, IncompleteRun, MisconfigurationException, MissingExtra, ModuleNotFoundError) as err:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        status = getattr(err, "exit_status", 2)
        while err.__cause__ is not None:  # jsonargparse wraps errors raised while building objects
            err = err.__cause__
        print(f"distill: error: {one_line(err)} (DISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(status) from None
    except RuntimeError as err:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        if "is killed by signal: Terminated" in str(err):  # a SIGTERM to the process group stops DataLoader workers
            _stopped(command)
        memory = ("can't allocate memory", "Storage size calculation overflowed")
        if not isinstance(err, torch.OutOfMemoryError) and not any(m in str(err) for m in memory):
            raise
        fix = "lower the batch size (data batch_size, latency_batch_size) or the input size"
        print(f"distill: error: out of memory ({_allocation(err)}): {fix} (DISTILL_DEBUG=1 shows the traceback)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None


@contextlib.contextmanager
def _noting_ctrl_c(pressed: threading.Event) -> Iterator[None]:
    """Set ``pressed`` when Ctrl-C (SIGINT) comes, then raise KeyboardInterrupt as Python does: Lightning turns it
    into ``sys.exit(1)``, and this is how the exit is known to be Ctrl-C's. A handler of the caller's is kept."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def note(signum: int, frame: Any) -> None:
        pressed.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: list[str], argv: Sequence[str] | None) -> None:
    """Run the command ``args`` names (``argv``: as given to :func:`main`)."""
    commands = ["fit", "validate", "test", "predict", *JOBS]
    if args and not args[0].startswith("-") and args[0] not in commands:  # Lightning's list omits the jobs
        close = difflib.get_close_matches(args[0], commands, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown command {args[0]!r}: {hint}choose from {', '.join(commands)}")
    if args and args[0] in JOBS:
        run_job(args[0], args[1:])
    elif not args or args[0] in ("-h", "--help"):
        try:
            DistillCLI(args=["--help"])
        except SystemExit:
            print("\nother commands:\n" + "\n".join(f"  {n:<15s}{doc}" for n, (_, doc) in JOBS.items()))
            raise
    else:
        cli = DistillCLI(args=None if argv is None else args)  # None: LightningCLI reads sys.argv itself
        stop_if_terminated(cli.trainer)


def one_line(err: BaseException) -> str:
    """``err``'s message; of an error a DataLoader worker raised, the worker's own message (torch re-raises it with the
    worker's traceback in front), on one line."""
    message = str(err)
    if "\nOriginal Traceback" not in message:
        return message
    own = re.compile(
        rf"^(?:[\w.]+\.)?{type(err).__name__}: ", re.MULTILINE
    )  # with its module: PIL.UnidentifiedImageError
    raised = list(own.finditer(message))
    message = message[raised[-1].end() :] if raised else message.strip().splitlines()[-1]
    return " ".join(message.split())


def _allocation(err: RuntimeError) -> str:
    """What an allocator failed to allocate, from its message (the CPU's in bytes, CUDA's in GiB)."""
    size = re.search(r"[Tt]ried to allocate ([\d.]+) ?([A-Za-z]*)", str(err))
    if "overflowed" in str(err):
        return "a tensor larger than any memory"
    if size is None:
        return str(err).splitlines()[0][:200]
    amount, unit = size.groups()
    if unit != "bytes":
        return f"{amount} {unit} asked for"
    for name, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if int(amount) >= scale:
            return f"{int(amount) / scale:.1f} {name} asked for"
    return f"{amount} bytes asked for"


def _stopped(command: str, by: str = "SIGTERM", status: int = 143) -> None:
    """Say that ``distill <command>`` was stopped (``by`` SIGTERM, or Ctrl-C) and how to go on; exit with ``status``,
    as the signal would (143, 130)."""
    if command in JOBS and command != "export":
        how = "run the same command again: it resumes, and the stages it finished are kept"
    elif command == "fit":
        how = ("run the same command again with --ckpt_path last (where its ModelCheckpoint saves last.ckpt) or "
               "--ckpt_path <a checkpoint of the run>")  # fmt: skip
    else:
        how = "run the same command again (what it had not finished was not written)"
    print(f"distill: stopped by {by}. To resume, {how}", file=sys.stderr)
    raise SystemExit(status) from None


if __name__ == "__main__":
    main()
