"""``DistillCLI``: LightningCLI for :class:`DistillModule`, checking a run before anything is written.

``distill fit --config configs/fmnist/kd.yaml`` runs it: the datamodule, the student, the teacher, the
loss and the callbacks are built from typed signatures (``class_path``/``init_args``), and the data's
``num_classes`` and ``in_chans`` are linked into the student. Jobs run their recipes through it too
(:mod:`distill.recipes`). Also here: the device policy (:func:`default_precision`) and the parsers whose
errors are one line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import sys
import threading
import warnings
from argparse import Action
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace, set_parsing_settings
from pytorch_lightning import Callback, LightningDataModule, Trainer
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint, WeightAveraging
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.data.base import SplitDataModule, check_trained_data, same_setting
from distill.module import TEACHER_DIGEST_KEY, DistillModule, check_resume_settings
from distill.predictions import PredictionWriter
from distill.rundir import atomic_path, check_run_dir, file_digest, rerooted
from students.checkpoint import is_training_checkpoint, read_checkpoint, recorded_data
from teachers import teacher_checkpoints

__all__ = ["DistillCLI", "JobParser", "default_precision", "keep_logged_rows", "stop_if_terminated", "stop_on_sigterm"]

# Values typed Any (a job's overrides and variants, a checkpoint's recorded specs) stay data: a ``class_path`` in
# them is never built into an object (jsonargparse 5's default) by the parser, from a config or a checkpoint.
set_parsing_settings(instantiate_subclass_spec_in_any=False)


#: A Sphinx role in a docstring: ``:func:`distill.latency.relative_to```, ``:class:`~distill.EMA```.
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
#: A type's "known subclasses" are all named in its help while those not the project's are at most so many:
#: Lightning's callbacks (32) are; torch.nn.Module's (1,500) are not.
_SUBCLASSES_SHOWN = 50


def plain_help(text: str) -> str:
    """Docstring markup as a terminal shows it: ````x```` and ``:func:`x``` become ```x``` (``~`` keeps the last
    name, as Sphinx does)."""
    text = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return text.replace("``", "`")


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the docstrings it shows without their reST markup, and a type's "known
    subclasses" cut to the project's when the others are too many: ``--model.student`` listed every
    ``torch.nn.Module`` imported (1,500 names, 4,000 of the 4,500 lines of ``distill fit --help``)."""

    def _get_help_string(self, action: Action) -> str:
        text = plain_help(super()._get_help_string(action))
        head, said, names = text.partition(", known subclasses: ")
        if not said:
            return text
        names = names.removesuffix(")").split(", ")
        ours = [n for n in names if n.split(".")[0] in ("distill", "students", "teachers")]
        others = [n for n in names if n not in ours]
        if len(others) <= _SUBCLASSES_SHOWN:
            return text
        shown = ours or others[:_SUBCLASSES_SHOWN]
        flag = action.option_strings[0] if action.option_strings else action.dest
        more = f"{len(names) - len(shown):,} more from torch, timm and others; {flag}.help CLASS shows one's options"
        return f"{head}{said}{', '.join(shown)}, and {more})"

    def start_section(self, heading: str | None) -> None:
        super().start_section(heading and plain_help(heading))

    def add_text(self, text: str | None) -> None:
        super().add_text(text and plain_help(text))


class _OneLineErrors:
    """An argument parser whose errors are one ``distill: error: ...`` line instead of the full usage.

    Abbreviated options are refused: ``--trainer.max_epoch`` must not silently mean ``--trainer.max_epochs``.
    """

    def __init__(self, *args: Any, source: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", PlainHelpFormatter)
        super().__init__(*args, **kwargs)
        self.source = source  # what is parsed, when not the command line: a job's recipe file

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("DISTILL_DEBUG"):
            super().error(message, ex)
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        if text.startswith("Unexpected config:"):  # jsonargparse's words for a file that is not a mapping
            got = text.removeprefix("Unexpected config:").strip()
            text = (f"a config file must map options to values (e.g. 'trainer: {{max_epochs: 2}}'); this one is "
                    f"{'empty' if not got else repr(got[:60])}")  # fmt: skip
        command = self.prog.replace(" [options]", "")
        where = f"{self.source}: " if self.source else ""
        print(f"distill: error: {where}{text} (options: {command} --help)", file=sys.stderr)
        raise SystemExit(2)


class _ArgumentParser(_OneLineErrors, LightningArgumentParser):
    """Lets ``link_arguments`` target the parameters of a factory function used as ``class_path``.

    jsonargparse (4.53) passes its private ``linked_targets`` to ``add_function_arguments``, which does not
    accept it, so linking ``data.num_classes`` into ``students.create_timm_model`` fails. ``linked_targets``
    only relaxes "required" on link targets, and jsonargparse clears those afterwards anyway.
    """

    def add_function_arguments(self, function: Callable, *args: Any, linked_targets: Any = None, **kwargs: Any):
        return super().add_function_arguments(function, *args, **kwargs)


class JobParser(_OneLineErrors, ArgumentParser):
    """The parser of the jobs (``distill sweep``, ``prune-distill``, ...)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        fit_keys = ("'trainer.", "'model.", "'data.", "'seed_everything'", "'optimizer", "'lr_scheduler")
        if str(message).startswith(tuple(f"Option {key}" for key in fit_keys)) and "not accepted" in str(message):
            recipe = "--recipe" if any(a.dest == "recipe" for a in self._actions) else "--kd_config or --teacher_config"
            message = f"{message}: that config is a distill fit recipe; give it to this command as {recipe}"
        super().error(message, ex)


class _Trainer(Trainer):
    """Lightning's Trainer, with ``limit_*_batches: 1`` meaning one batch, as Lightning documents.

    Lightning annotates these ``float | int``: parsed from a config, ``1`` became ``1.0``, which Lightning
    reads as all of the batches. Every other argument goes to Lightning's Trainer unchanged.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        at_least = {"check_val_every_n_epoch": 1, "accumulate_grad_batches": 1, "log_every_n_steps": 1}
        at_least |= {"num_sanity_val_steps": -1, "max_epochs": -1, "max_steps": -1}
        wrong = [f"{k}={kwargs[k]}" for k, low in at_least.items() if kwargs.get(k) is not None and kwargs[k] < low]
        interval = kwargs.get("val_check_interval")
        wrong += [f"val_check_interval={interval}"] if isinstance(interval, (int, float)) and interval <= 0 else []
        if wrong:  # Lightning divides by some of them at fit time, after the run folder is touched
            raise ValueError(f"trainer: {', '.join(wrong)} is out of range (its options: `distill fit --help`)")
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


#: DistillModule's settings of how the student runs, not of what it learns: a resumed fit may change them.
_MACHINE_SETTINGS = ("compile", "channels_last")


def _is_run(folder: Path, checkpoints: bool) -> bool:
    """Whether ``folder`` holds a ``distill fit`` run: the ``config.yaml`` it saves, and, where it is not the
    ``checkpoints`` folder itself, the logs beside it (a user's own recipe named ``config.yaml`` beside the
    ``checkpoints/`` it writes is no run)."""
    logs = ("metrics.csv", "hparams.yaml", "events.out.tfevents.*")
    return (folder / "config.yaml").is_file() and (checkpoints or any(any(folder.glob(name)) for name in logs))


#: Written into the log folder of an evaluation of another run's checkpoint: which checkpoint (path and digest), so
#: that evaluating it there again appends its rows (another checkpoint's are refused).
EVALUATED = "evaluated.json"


def _evaluated(folder: Path) -> str | None:
    """The digest of the checkpoint whose evaluation ``folder`` logs (:data:`EVALUATED`), if it records one."""
    try:
        return json.loads((folder / EVALUATED).read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def _earlier_fixed_checkpoints(callback: Any, log_dir: Path) -> list[Path]:
    """The files already at the fixed names (``best``, ``last``) a ``ModelCheckpoint`` with Lightning's version
    counter writes into the run's folder ``log_dir`` (or its ``checkpoints``, where one without a dirpath writes)."""
    if not isinstance(callback, ModelCheckpoint) or not callback._enable_version_counter:
        return []
    folder = Path(callback.dirpath).resolve() if callback.dirpath else log_dir / "checkpoints"
    if folder not in (log_dir, log_dir / "checkpoints"):
        return []
    names = [callback.filename, callback.CHECKPOINT_NAME_LAST if callback.save_last else None]
    paths = [folder / f"{name}{callback.FILE_EXTENSION}" for name in names if name and "{" not in name]
    return [path for path in paths if path.is_file()]


def stale_last_checkpoints(callbacks: list[Any]) -> list[ModelCheckpoint]:
    """The monitored ``ModelCheckpoint``s with ``save_last=True`` where no unmonitored one saves every epoch: their
    ``last.ckpt`` is a copy of the last better checkpoint, not the end of the last epoch."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    if any(c.monitor is None and c.save_top_k != 0 and c.every_n_epochs == 1 for c in checkpoints):
        return []  # last.ckpt (or its own file) is written every epoch beside them
    return [c for c in checkpoints if c.monitor is not None and c.save_last is True]


def default_precision() -> str:
    """``bf16-mixed`` where a GPU with bfloat16 is present, else ``32-true`` (CPUs stay float32)."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _asked_subcommand(args: Any, subcommands: set[str]) -> str | None:
    """The subcommand ``args`` (a command line, or a config as a dict) asks for, where it is plain: the first
    word of a command line, or the one subcommand's key of a dict; ``None`` (all are parsed) otherwise."""
    if isinstance(args, (dict, Namespace)):
        keys = [key for key in (vars(args) if isinstance(args, Namespace) else args) if key in subcommands]
        return keys[0] if len(keys) == 1 and args.get("subcommand", keys[0]) == keys[0] else None
    first = next(iter(args or []), None)
    return first if first in subcommands else None


class DistillCLI(LightningCLI):
    """LightningCLI for :class:`DistillModule` with any datamodule, linking data shape into the student.

    ``trainer.precision`` defaults to :func:`default_precision` (a config or ``--trainer.precision`` wins).
    """

    def __init__(self, *args: Any, job_phase: bool = False, **kwargs: Any) -> None:
        """``job_phase``: a phase of a job (quickstart, sweep, prune-distill), which owns its folder, reads the best
        checkpoint's path (not ``best.ckpt`` by name) and reruns a stopped attempt there: the guards of a user's
        rerun into a run's folder (:func:`_earlier_fixed_checkpoints`, :class:`_EarlierRun`) are off."""
        self._replaced: _EarlierRun | None = None
        self._job_phase = job_phase
        every, given = type(self).subcommands(), kwargs.get("args")
        asked = _asked_subcommand(sys.argv[1:] if given is None else given, set(every))
        if asked and not any(key in every and key != asked for key in kwargs.get("parser_kwargs") or {}):
            # Only its parser is built (each took 0.1 s, and every fit and phase of a job built all four); the class
            # keeps Lightning's static subcommands()
            self.subcommands = lambda: {asked: every[asked]}  # type: ignore[method-assign]
        kwargs.setdefault("trainer_defaults", {"precision": default_precision(), "callbacks": [_ResumedRun()]})
        kwargs.setdefault("parser_class", _ArgumentParser)
        kwargs.setdefault("trainer_class", _Trainer)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-running a recipe replaces its run
        kwargs.setdefault("parser_kwargs", {"prog": "distill"})  # also when run from Python (tests, jobs)
        super().__init__(DistillModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for attr in _LINKED:
            parser.link_arguments(f"data.{attr}", f"model.student.init_args.{attr}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check what was asked before LightningCLI merges a checkpoint's hyperparameters in.

        With ``--ckpt_path``, LightningCLI takes the model's settings from the checkpoint over the config's;
        a config that asks for other optimizer settings is refused instead of being silently overridden.
        """
        super().parse_arguments(parser, args)
        structured = isinstance(args, (dict, Namespace))
        given = parser.parse_object(args, defaults=False) if structured else parser.parse_args(args, defaults=False)
        subcommand = self.config.get("subcommand")
        config, given = (self.config[subcommand], given[subcommand]) if subcommand else (self.config, given)
        self._given_student = given.get("model", Namespace()).get("student")
        self._checkpoint, self._settings = None, None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and str(ckpt_path) not in ("last", "best", "hpc") and "://" not in str(ckpt_path):
            source = f"--ckpt_path {str(ckpt_path)!r}"
            checkpoint = read_checkpoint(ckpt_path)
            if not is_training_checkpoint(checkpoint):
                load = f"--model.student students.load_student --model.student.init_args.path {ckpt_path}"
                use = (
                    f"to {subcommand} it, {load} (without --ckpt_path)"
                    if subcommand in _EVALUATE
                    else f"to train from its weights, {load} --model.student.init_args.train true"
                )
                raise ValueError(
                    f"{source} holds a student's weights, not a checkpoint written by `distill fit` (no training "
                    f"state): {use}; to deploy it, use `distill export`"
                )
            self._checkpoint = (source, checkpoint)
            self._settings = config.model.as_dict() if subcommand == "fit" else None  # before its hparams merge in

    def before_instantiate_classes(self) -> None:
        """A resumed fit keeps this run's machine settings (``compile``, ``channels_last``), which LightningCLI would
        take from the checkpoint's hyperparameters without a word: a run moved to another machine sets its own."""
        if self._settings is not None:
            model = self.config[self.config["subcommand"]].model
            for key in _MACHINE_SETTINGS:
                if key in self._settings:
                    model[key] = self._settings[key]

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Check the run before the Trainer, its logger and its callbacks exist, then build them.

        Bad input (data, teacher, ``--ckpt_path``) is refused here, before any file of an earlier run in
        the same folder is touched. Only ``fit`` saves its config: evaluating a checkpoint must not
        replace the config of the run that trained it.
        """
        self.check_run()
        if self.subcommand not in (None, "fit"):
            self.save_config_callback = None
        trainer = super().instantiate_trainer(**kwargs)
        self._check_weights(trainer)
        self._check_evaluated_data(trainer)
        self._check_log_folder(trainer)
        self._check_checkpoint_folder(trainer)
        self._check_resumed(trainer)
        new_fit = self.subcommand == "fit" and self._command_config.get("ckpt_path") is None and not self._job_phase
        self._replaced = _EarlierRun(trainer) if new_fit else None  # before before_fit rewrites metrics.csv
        return trainer

    def fit(self, **kwargs: Any) -> None:
        """``Trainer.fit``; a new fit that fails before it saves a checkpoint (an unreadable image found mid-epoch,
        out of memory, a stop) puts back the records of the run it was replacing (:class:`_EarlierRun`)."""
        try:
            self.trainer.fit(**kwargs)
        except BaseException:
            if self._replaced is not None and self.trainer.is_global_zero:
                self._replaced.put_back(self.trainer)
            raise

    @property
    def _command_config(self) -> Any:
        """The parsed options of the subcommand that runs (all of them when run without one)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def _check_checkpoint_folder(self, trainer: Trainer) -> None:
        """Refuse a fit whose ``ModelCheckpoint`` writes into the folder of another run (:func:`_is_run`: there, or
        the folder above, as in Lightning's ``<log_dir>/checkpoints``; this run's elsewhere): that run's
        ``last.ckpt`` would be replaced, with its config and metrics left describing it (a recipe copied, its log
        folder changed, its checkpoints' not; or a run resumed to train on, logging elsewhere). Nor, without
        Lightning's ``-v1`` names, a folder of checkpoints a new log folder does not hold (a logger that starts a
        version per run, the checkpoints kept elsewhere): the run before's would be replaced."""
        if self.subcommand not in (None, "fit"):
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir).resolve()
        config = self._command_config
        for callback in trainer.checkpoint_callbacks:
            folder = Path(callback.dirpath).resolve() if getattr(callback, "dirpath", None) else None
            run = next((f for f in (folder, folder.parent) if _is_run(f, f == folder)), None) if folder else None
            if run is not None and log_dir not in (folder, run):
                raise ValueError(
                    f"ModelCheckpoint would write into {folder}, in the folder of another run (its config.yaml in "
                    f"{run}), whose checkpoints would be replaced; this run logs into {log_dir}. Give the "
                    f"ModelCheckpoint that folder (its init_args.dirpath in the config's trainer.callbacks), or log "
                    f"into {run}"
                )
            replaced = not getattr(callback, "_enable_version_counter", True)  # Lightning's -v1 names keep them
            if (replaced and folder is not None and not log_dir.exists() and config.get("ckpt_path") is None
                    and not folder.is_relative_to(log_dir) and any(folder.glob("*.ckpt"))):  # fmt: skip
                raise ValueError(
                    f"ModelCheckpoint would write into {folder}, which holds the checkpoints of an earlier run, and "
                    f"replace them (enable_version_counter: false); this run logs into {log_dir}, a new folder (a "
                    f"logger that starts a version per run). Give the ModelCheckpoint a folder of its own (its "
                    f"init_args.dirpath in the config's trainer.callbacks), or give the logger a fixed version to "
                    f"rerun that run"
                )
            earlier = [] if self._job_phase else _earlier_fixed_checkpoints(callback, log_dir)
            if earlier and self.subcommand == "fit" and config.get("ckpt_path") is None:
                name = earlier[0].name
                raise ValueError(
                    f"{earlier[0]} is an earlier run's checkpoint: this fit would replace the config.yaml and logs "
                    f"of {log_dir} but write {earlier[0].stem}-v1.ckpt beside {name} (Lightning's version counter), "
                    f"so {name} would load the earlier run's weights. Set enable_version_counter: false on the "
                    f"ModelCheckpoint to replace that run (as configs/ do), resume it with --ckpt_path last, or log "
                    f"into another folder"
                )

    def _check_log_folder(self, trainer: Trainer) -> None:
        """Refuse to evaluate another run's checkpoint into the log folder of the recipe's run (a ``CSVLogger`` of a
        fixed version): its ``metrics.csv`` would take rows of another model (and ``predict`` replace its
        ``predictions.csv``). A checkpoint is the run's if it lies in that folder or in a ``ModelCheckpoint``'s; a
        folder where this checkpoint was evaluated before (:data:`EVALUATED`) takes its rows again."""
        self._evaluation_logs: list[tuple[Path, dict[str, str]]] = []
        if self.subcommand not in _EVALUATE:
            return
        config = self.config[self.subcommand]
        if self._checkpoint is not None:
            source, checkpoint = self._checkpoint[0], Path(config.ckpt_path).resolve()
        elif config.get("ckpt_path") is None and (path := _student_file(config.model.student)) is not None:
            source, checkpoint = f"The student students.load_student loads ({path})", Path(path).resolve()
        else:
            return
        writers = [c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)]
        default = not writers or any(isinstance(w, PredictionWriter) and not w.path for w in writers)
        if self.subcommand == "predict" and not default:
            return  # the predictions go to files of their own (or a writer of the user's), and predict logs no metrics
        own = [Path(c.dirpath).resolve() for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if self.subcommand == "predict":  # where PredictionWriter writes predictions.csv, logger or not
            folders = [Path(trainer.log_dir or trainer.default_root_dir).resolve()]
        else:
            folders = [Path(logger.log_dir).resolve() for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        digest = None
        for folder in folders:
            if checkpoint.is_relative_to(folder):
                continue
            digest = digest or file_digest(checkpoint)
            fitted = (folder / "config.yaml").is_file()  # a fit's run is no evaluation's (a marker there is stale)
            recorded = None if fitted else _evaluated(folder)  # an evaluation's folder: of this checkpoint, rows go on
            if not fitted:
                self._evaluation_logs.append((folder, {"checkpoint": str(checkpoint), "digest": digest}))
            if recorded == digest or (recorded is None and any(checkpoint.is_relative_to(f) for f in own)):
                continue
            if recorded is not None or any((folder / n).is_file() for n in ("metrics.csv", "config.yaml",
                                                                               "predictions.csv")):  # fmt: skip
                fix = (
                    "predictions.csv would be replaced by another model's: give them a file of their own "
                    "(--trainer.callbacks+=distill.PredictionWriter --trainer.callbacks.path <file>)"
                    if self.subcommand == "predict"
                    else f"metrics.csv would take rows of another model: give this {self.subcommand} a log folder of "
                    f"its own (the logger's save_dir, e.g. --trainer.logger.init_args.save_dir "
                    f"{checkpoint.parent / f'{checkpoint.stem}_{self.subcommand}'})"
                )
                run = f"the run in {folder}" if recorded is None else f"the checkpoint evaluated in {folder}"
                raise ValueError(f"{source} is not {run}, whose {fix}")

    def _check_resumed(self, trainer: Trainer) -> None:
        """Refuse to resume a fit on another train/validation split, or with another teacher, than its checkpoint's:
        images it trained on would be validated on and choose its best checkpoint, or the targets it learns would
        change half-way through, without a word."""
        config = self._command_config
        if self.subcommand not in (None, "fit"):
            return
        if self._checkpoint is not None:
            source, checkpoint = self._checkpoint
        elif config.get("ckpt_path") == "last":
            path = _last_checkpoint(trainer)
            if path is None:
                return
            source, checkpoint = f"--ckpt_path last ({path})", read_checkpoint(path)
        else:
            return
        mixup = (self._settings or self.model.hparams).get("mixup")  # the config's: LightningCLI merged the record's in
        self.model.check_resumed_objective(checkpoint, source, mixup)
        self._check_resumed_teacher(source, checkpoint)
        if "current_model_state" in checkpoint and not any(isinstance(c, WeightAveraging) for c in trainer.callbacks):
            raise ValueError(  # Lightning warns, then trains on from the average and drops the weights it trained
                f"{source} was trained with an average of its weights (distill.EMA): its state_dict holds the "
                f"average, and its trained weights are kept apart for the averaging callback. Resume with that "
                f"callback in trainer.callbacks (distill.EMA, its decay as before), or start a new run."
            )
        if self.datamodule is not None:
            self._check_resumed_data_class(source, checkpoint)
        if isinstance(self.datamodule, SplitDataModule):
            self._check_resumed_data(source, checkpoint)

    def _check_resumed_data_class(self, source: str, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint of one of distill's datamodules (Lightning keeps a datamodule's state under
        its class name) with data of another class: the rest of the run would learn from other images."""
        this, (other, _) = type(self.datamodule).__qualname__, recorded_data(checkpoint) or (None, None)
        if other is not None and this not in checkpoint:
            raise ValueError(
                f"{source} was trained on the data of {other}, but this run's data is {this}: the rest of the run "
                f"would learn from other images. Resume with the original data class_path, or start a new run."
            )

    def _check_resumed_data(self, source: str, checkpoint: dict[str, Any]) -> None:
        """Refuse a resumed fit whose data holds other images (an image folder's listing), splits otherwise, or
        makes other training batches (their size, their augmentation, their input size), than its checkpoint's run:
        precision, ``compile`` and ``channels_last`` may change (a run moved to another machine), and so may where
        the data lies, but not what the student learns from."""
        harm = {
            "split": "its validation images would include images it trained on",
            "batches": "the rest of the run would learn from other batches than the checkpoint's run did (and its "
            "config.yaml describe them as the whole run's)",
            "images": "the rest of the run would learn from, and choose its best checkpoint on, other images",
        }
        state = self.datamodule.state_dict()
        for key, consequence in harm.items():
            recorded, current = type(self.datamodule).recorded(checkpoint, key), state.get(key) or {}
            changed = [k for k in current if recorded is not None and not same_setting(recorded.get(k), current[k])]
            if changed:
                was, now = (", ".join(f"{k}={of.get(k)!r}" for k in changed) for of in (recorded, current))
                raise ValueError(
                    f"{source} was trained with data {was}, but this run's data has {now}: {consequence}. Resume "
                    f"with the original data settings, or start a new run."
                )

    def _check_resumed_teacher(self, source: str, checkpoint: dict[str, Any]) -> None:
        """Refuse a resumed fit whose teacher is not the one its checkpoint was trained with (by the digest of its
        weights, wherever its file lies; a checkpoint written before the digest was recorded is not checked)."""
        given, merged = (self._settings or {}).get("teacher_checkpoint"), self.model.hparams.get("teacher_checkpoint")
        if given is not None and (self._settings or {}).get("teacher") is None and given != merged:
            raise ValueError(
                f"{source} records teacher_checkpoint={merged!r}, which LightningCLI takes over this run's {given!r}: "
                f"to resume with the teacher elsewhere, give it as model.teacher (teachers.load_teacher with "
                f"init_args {{checkpoint: ...}}); its weights are checked against the run's"
            )
        if TEACHER_DIGEST_KEY not in checkpoint or not _first_local_rank():  # the first process loaded the teacher
            return
        recorded, teacher = checkpoint[TEACHER_DIGEST_KEY], self.model.teacher  # loaded by check_run's check_data
        if recorded == self.model.teacher_digest:
            return
        named = teacher_checkpoints(teacher) if teacher is not None else None
        now = "no teacher" if teacher is None else f"the teacher {named}" if named else "a teacher of no file"
        was = "distilled from another teacher" if teacher is not None else "distilled from a teacher"
        was = "trained without a teacher" if recorded is None else was
        raise ValueError(
            f"{source} was {was}, but this run has {now}{' (their weights differ)' if recorded and teacher else ''}: "
            f"its targets would change half-way through the run. Resume with the original teacher, or start a new "
            f"run (to start from its weights: model.student students.load_student with init_args {{path: ..., "
            f"train: true}})"
        )

    def _check_weights(self, trainer: Trainer) -> None:
        """Refuse to evaluate the random weights of a recipe's student: ``validate``/``test``/``predict`` with no
        ``--ckpt_path``, or with ``last`` where there is none (Lightning warns and goes on), unless the student
        spec loads trained weights itself."""
        config = self._command_config
        ckpt_path = config.get("ckpt_path")
        if self.subcommand not in _EVALUATE or ckpt_path not in (None, "last") or _loads_weights(config.model.student):
            return
        if ckpt_path is None:
            raise ValueError(
                f"distill {self.subcommand} without --ckpt_path would {self.subcommand} the recipe's student as "
                f"built, with random weights: give --ckpt_path <run>/best.ckpt (written by `distill fit`), or "
                f"set model.student to students.load_student"
            )
        if not _last_checkpoints(trainer):
            raise ValueError(
                "--ckpt_path last: the recipe's checkpoint folder holds no last checkpoint, and the student "
                "as built has random weights: give the path of a checkpoint written by `distill fit`"
            )

    def check_run(self) -> None:
        """Set up the data and check the student, the teacher and ``--ckpt_path`` against it; write nothing.

        The data and models are checked by the first process of each machine (DDP ranks started together by
        torchrun would download at once); every rank checks them again in ``setup``.
        """
        self._check_links()
        self._check_batches()
        if self.subcommand in (None, "fit"):
            for folder in self._output_folders():
                check_run_dir(folder, "fit")  # a job's run folder: its record would be trained over
        if self._checkpoint is not None:  # before the data: a checkpoint of other data would blame its teacher
            source, checkpoint = self._checkpoint
            self.model.check_checkpoint(checkpoint, source)  # the architecture first: the bigger difference
            if self._settings is not None:
                check_resume_settings(checkpoint, self._settings, source)
        if _first_local_rank():  # one download per machine
            if self.datamodule is not None:
                self.datamodule.prepare_data()
                self.datamodule.setup(self.subcommand or "fit")
            self.model.check_data(self.datamodule, fitting=self.subcommand in (None, "fit"))
            if self.datamodule is not None and hasattr(self.datamodule, "input_size"):
                x = torch.zeros(1, self.datamodule.in_chans, *self.datamodule.input_size)
                trainer_config = self._get(self.config_init, "trainer", default={}) or {}
                for callback in trainer_config.get("callbacks") or []:
                    if callable(getattr(callback, "check", None)):  # e.g. ChannelPruning: layers, target
                        callback.check(self.model.student, x)

    def _check_evaluated_data(self, trainer: Trainer) -> None:
        """Refuse to evaluate a checkpoint (a file, ``last``, or the student ``students.load_student`` loads without
        ``--ckpt_path``) on data of other classes or another normalisation than it was trained on (its scores and
        predictions would mean nothing); warn at another input size."""
        if self.subcommand not in _EVALUATE or self.datamodule is None:
            return
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        source, checkpoint = self._checkpoint or (None, None)
        if ckpt_path == "last" and (path := _last_checkpoint(trainer)):
            source, checkpoint = f"--ckpt_path last ({path})", read_checkpoint(path)
        trained_on = recorded_data(checkpoint) if checkpoint is not None else None
        if ckpt_path is None and getattr(self.model.student, "trained_on", None) is not None:
            source, trained_on = "The student (students.load_student)", self.model.student.trained_on
        if trained_on is not None:
            check_trained_data(
                source, trained_on, self.datamodule,
                f"its {self.subcommand} results would mean nothing. Evaluate it on data with the classes and "
                f"normalisation it was trained with.",
                "its scores here are not those at its own size",
            )  # fmt: skip

    def _output_folders(self) -> set[Path]:
        """The folders the Trainer would write into: its ``default_root_dir``, its ModelCheckpoints' and loggers'."""
        trainer = self._get(self.config_init, "trainer", default={}) or {}
        loggers = trainer.get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        folders = [trainer.get("default_root_dir")]
        folders += [
            getattr(c, "dirpath", None) for c in trainer.get("callbacks") or [] if isinstance(c, ModelCheckpoint)
        ]
        folders += [logger.log_dir for logger in loggers if isinstance(logger, CSVLogger)]
        return {Path(f) for f in folders if f}

    def _check_batches(self) -> None:
        """Refuse a run of no batch (``limit_*_batches`` 0, or ``max_epochs``/``max_steps`` 0 for fit): Lightning
        runs it, writes a run folder's config and logs beside an earlier run's checkpoints, and reports nothing."""
        stage = self.subcommand or "fit"
        trainer = self._get(self.config_init, "trainer", default={}) or {}
        for name in _BATCHES[stage]:
            if trainer.get(name) == 0:
                no_limit = " (or -1: no limit)" if name.startswith("max_") else ""
                raise ValueError(f"trainer.{name}=0: distill {stage} would run no batch; give {name} > 0{no_limit}")
        if stage != "fit" or trainer.get("limit_val_batches") != 0:
            return
        for callback in trainer.get("callbacks") or []:  # Lightning warns and saves no best: an earlier one would stay
            if isinstance(callback, ModelCheckpoint) and str(callback.monitor).startswith("val"):
                raise ValueError(f"trainer.limit_val_batches=0: nothing logs {callback.monitor}, which the "
                                 f"ModelCheckpoint keeps the best checkpoint by; give limit_val_batches > 0, or drop "
                                 f"its monitor")  # fmt: skip

    def _check_links(self) -> None:
        """Refuse a student ``num_classes``/``in_chans`` given against the data: the link would override it."""
        given = self._given_student.get("init_args") if isinstance(self._given_student, Namespace) else None
        for attr in _LINKED if isinstance(given, Namespace) else ():
            value, data_value = given.get(attr), getattr(self.datamodule, attr, None)
            if value is not None and data_value is not None and value != data_value:
                raise ValueError(
                    f"model.student.init_args.{attr}={value} contradicts the data: {type(self.datamodule).__name__} "
                    f"has {attr}={data_value}, and the CLI sets it in the student. Remove {attr} from the student."
                )

    def before_fit(self) -> None:
        """Keep the earlier rows of metrics.csv until the run is known: ``_ResumedRun`` trims them then."""
        keep_logged_rows(self.trainer, lambda _row: True)
        for callback in stale_last_checkpoints(self.trainer.checkpoint_callbacks):
            rank_zero_warn(
                f"ModelCheckpoint(monitor={callback.monitor!r}, save_last=True) writes last.ckpt only when it saves a "
                f"better checkpoint (Lightning's save_last), so --ckpt_path last would go back to that epoch and "
                f"train the epochs after it again. Save last.ckpt every epoch with a ModelCheckpoint of its own "
                f"(filename: last, no monitor), as configs/fmnist/teacher.yaml does"
            )

    def before_validate(self) -> None:
        keep_logged_rows(self.trainer, lambda _row: True)  # evaluation rows go after the training's

    before_test = before_validate

    def before_predict(self) -> None:
        """Predictions go to ``predictions.csv`` (:class:`PredictionWriter`) unless the config names a writer. Where
        every writer names its file, nothing is logged: the recipe's log folder (``hparams.yaml``) is left alone."""
        self.before_validate()
        writers = [c for c in self.trainer.callbacks if isinstance(c, BasePredictionWriter)]
        if not writers:
            self.trainer.callbacks.append(PredictionWriter())
        elif all(isinstance(w, PredictionWriter) and w.path for w in writers):  # a folder's hparams.yaml: not the
            files = (CSVLogger, TensorBoardLogger)  # predicted checkpoint's; other loggers (W&B, MLflow) stay
            self.trainer.loggers = [lg for lg in self.trainer.loggers if not isinstance(lg, files)]

    def after_validate(self) -> None:
        """Record, in a log folder of its own, which checkpoint an evaluation was of (:data:`EVALUATED`)."""
        for folder, record in self._evaluation_logs:
            if folder.is_dir():
                with atomic_path(folder / EVALUATED) as partial:
                    partial.write_text(json.dumps(record) + "\n")

    after_test = after_predict = after_validate


def stop_if_terminated(trainer: Any) -> None:
    """Raise Lightning's ``SIGTERMException`` if ``trainer`` received a SIGTERM it did not act on, or one came
    outside a Trainer run and was swallowed (:func:`stop_on_sigterm`).

    Lightning stops at the next check of its loops, but none follows the last epoch, the last evaluation batch
    or any prediction batch: a SIGTERM there is forgotten, and the next Trainer of a job clears it.
    """
    if getattr(trainer, "received_sigterm", False) or _terminated.is_set():
        raise SIGTERMException


_terminated = threading.Event()  # set by stop_on_sigterm's handler


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Stop with ``SIGTERMException`` on a SIGTERM that comes outside a Trainer run (a job's surgery, timing,
    export or report; a fit's setup), as Lightning stops a Trainer run at its next check: a job writes its records
    atomically, so its rerun resumes, and the user is told how.

    - While a Trainer runs, Lightning's handler calls this one after its own, and this one leaves the stop to it.
    - Code that swallows every exception (torch-pruning's tracing has a bare ``except``) cannot lose the stop: it is
      kept, and :func:`stop_if_terminated` raises it again after the next Trainer run; a second SIGTERM ends the
      process as the default action does.
    - A process forked outside a Trainer run (a DataLoader worker) ends as the default action ends it.
    - A SIGTERM the caller ignores (``SIG_IGN``) stays ignored.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield
        return
    pid = os.getpid()

    def stop(_signum: int, _frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is not stop:  # called by Lightning's handler: a Trainer runs
            return
        if os.getpid() != pid or _terminated.is_set():  # a forked child, or a second SIGTERM: end now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _terminated.set()
        raise SIGTERMException

    _terminated.clear()
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _terminated.clear()


#: Data attributes linked into the student's arguments.
_LINKED = ("num_classes", "in_chans")
#: The subcommands that evaluate a student's weights: refused on the random ones of a recipe's student.
_EVALUATE = ("validate", "test", "predict")
#: The Trainer settings that leave each command no batch to run when they are 0.
_BATCHES = {
    "fit": ("limit_train_batches", "max_epochs", "max_steps"),
    "validate": ("limit_val_batches",),
    "test": ("limit_test_batches",),
    "predict": ("limit_predict_batches",),
}


def _last_checkpoints(trainer: Trainer) -> list[str]:
    """The last checkpoints the Trainer's ModelCheckpoints find (what ``--ckpt_path last`` resumes from)."""
    return [p for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)
            for p in c._find_last_checkpoints(trainer)]  # fmt: skip


def _last_checkpoint(trainer: Trainer) -> str | None:
    """The checkpoint ``--ckpt_path last`` loads: the newest of :func:`_last_checkpoints` (``None``: there is none)."""
    return max(_last_checkpoints(trainer), key=os.path.getmtime, default=None)


def _first_local_rank() -> bool:
    """Whether this is the first process on its machine (the one that checks data and models before the Trainer)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0


def _named(spec: Any) -> tuple[str, dict[str, Any]]:
    """A ``model.student`` spec's class or function name and its ``init_args`` (``""`` and none for an object)."""
    spec = spec.as_dict() if isinstance(spec, Namespace) else spec
    if not isinstance(spec, dict):
        return "", {}
    return str(spec.get("class_path", "")).rsplit(".", 1)[-1], spec.get("init_args") or {}


def _student_file(spec: Any) -> str | None:
    """The checkpoint a ``model.student`` spec loads its trained weights from (``students.load_student``'s
    ``path``, unless ``from_scratch``), or ``None``."""
    name, args = _named(spec)
    loads = name == "load_student" and args.get("path") and not args.get("from_scratch", False)
    return str(args["path"]) if loads else None


def _loads_weights(spec: Any) -> bool:
    """Whether a ``model.student`` spec builds a student with trained weights: a checkpoint loaded
    (``students.load_student``, not ``from_scratch``; a teacher's loader) or timm's pretrained ones."""
    name, args = _named(spec)
    if name == "load_student":
        return not args.get("from_scratch", False)
    if name == "load_teachers" or (name == "load_teacher" and args.get("checkpoint")):
        return True
    return bool(args.get("pretrained")) or "checkpoint_path" in (args.get("model_kwargs") or {})


class _EarlierRun:
    """The records of the run a new fit in the same folder replaces (``config.yaml``, ``hparams.yaml``,
    ``metrics.csv``), read before the fit writes any. :meth:`put_back` restores them if the fit ends before it saved a
    checkpoint: a failed fit then leaves the earlier run as it was, not its checkpoints beside this run's config."""

    RECORDS = ("config.yaml", "hparams.yaml", "metrics.csv")

    def __init__(self, trainer: Trainer) -> None:  # before the fit: no process group, no collective in log_dir
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folders = {log_dir} | {Path(logger.log_dir) for logger in trainer.loggers if isinstance(logger, CSVLogger)}
        self.records = {f / name: _read_bytes(f / name) for f in folders for name in self.RECORDS}
        self.folders = {log_dir / "checkpoints"}
        self.folders |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        self.checkpoints = self._checkpoints()

    def _checkpoints(self) -> dict[Path, tuple[int, int]]:
        """The checkpoint files where this fit writes its, with their times and sizes."""
        found = (path for folder in self.folders if folder.is_dir() for path in folder.glob("*.ckpt"))
        return {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in found}

    def put_back(self, trainer: Trainer) -> None:
        """Restore the earlier run's records where this fit failed in its first epoch having saved no checkpoint,
        and the earlier run had some (a run that saves none keeps its records: its logs are all there is of it)."""
        if trainer.current_epoch > 0 or not self.checkpoints or not any(self.records.values()):
            return
        if self._checkpoints() != self.checkpoints:
            return
        for path, data in self.records.items():
            if data is None:
                path.unlink(missing_ok=True)
            elif _read_bytes(path) != data:
                with atomic_path(path) as partial:
                    partial.write_bytes(data)


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


class _ResumedRun(Callback):
    """A fit keeps the metrics rows logged before the checkpoint it resumed from; a new fit keeps none. In a run
    folder moved or copied with its checkpoints, it resumes knowing its best one.

    The rows: when training starts, once Lightning has resolved ``--ckpt_path`` (a path, ``last``, ``hpc``) and
    restored ``global_step``, the rows of steps from there on are logged again by this run.
    """

    def on_load_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        _follow_moved_checkpoints(trainer, checkpoint)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        keep_logged_rows(trainer, lambda row: int(float(row.get("step") or 0)) < trainer.global_step)


def _follow_moved_checkpoints(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Move the recorded paths of each ``ModelCheckpoint`` whose folder holds the checkpoints it recorded elsewhere:
    the run was moved or copied. Lightning's callback keeps only the old best path then, and forgets the best
    score, so the next epoch took ``best.ckpt``, better or not. Lightning calls every callback's
    ``on_load_checkpoint`` before any callback loads its state."""
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.checkpoint_callbacks:
        state = states.get(getattr(callback, "state_key", None))
        if not isinstance(callback, ModelCheckpoint) or not isinstance(state, dict) or callback.dirpath is None:
            continue
        old, new, best = state.get("dirpath"), callback.dirpath, state.get("best_model_path")
        if old is None or old == new or not best or not (Path(new) / Path(best).name).is_file():
            continue  # the same folder, or a run resumed into a folder of its own: Lightning's way
        states[callback.state_key] = rerooted(state, old, new) | {"dirpath": new}


def keep_logged_rows(trainer: Any, keep: Callable[[dict[str, str]], bool]) -> None:
    """Keep the rows of each ``CSVLogger``'s ``metrics.csv`` that ``keep`` accepts (rewritten atomically).

    Lightning's CSV writer deletes a ``metrics.csv`` it finds when it starts, so a resumed run or an
    evaluation in the training's folder would lose the training's rows: they are read first.
    """
    for logger in trainer.loggers if trainer.is_global_zero else ():  # rank 0 writes the logs
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        header, rows = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [row for row in reader if keep(row)]
                header = list(reader.fieldnames or [])
        with warnings.catch_warnings():  # its "previous log files will be deleted": they are kept, here
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = logger.experiment  # Lightning's writer: deletes metrics.csv when it is created
        writer.metrics_keys = header if rows else []  # the columns its next rows are appended under
        if rows:
            with atomic_path(path) as partial, open(partial, "w", newline="") as f:
                table = csv.DictWriter(f, fieldnames=header)
                table.writeheader()
                table.writerows(rows)
        else:
            path.unlink(missing_ok=True)
