"""Running a YAML recipe of ``configs/`` from Python, as jobs that train several times do.

A recipe is a ``distill fit`` config. Jobs load it, change it (sizes, outputs, loss settings),
write the exact config they run next to its outputs, and run it through the same CLI.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning import LightningDataModule

from distill.data import SplitDataModule
from distill.lightning_cli import DistillCLI, stop_if_terminated
from distill.rundir import RunState, atomic_write, file_digest, rerooted

__all__ = [
    "FitResult",
    "build_datamodule",
    "by_contents",
    "check_recipe",
    "check_sections",
    "check_teacher",
    "fingerprint",
    "fingerprints",
    "fit_recipe",
    "image_identity",
    "input_digests",
    "job_recipe",
    "load_recipe",
    "merge",
    "recipe_identities",
    "recipe_identity",
    "relocate",
    "sibling_config",
    "teacher_cache",
    "what_trains",
    "with_callbacks",
    "without_root",
]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` as a dict, with a clear error when it is missing or not a YAML mapping."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"Recipe {str(path)!r} is a folder: give its YAML file (e.g. {file / 'config.yaml'})")
    if not file.is_file():
        raise FileNotFoundError(f"Recipe {str(path)!r} not found. Run from the repository root or pass its path.")
    try:
        cfg = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"Recipe {str(path)!r} is not valid YAML{line}: {problem}") from None
    if not isinstance(cfg, dict):
        raise ValueError(
            f"Recipe {str(path)!r} holds {type(cfg).__name__ if cfg is not None else 'nothing'}, not a mapping of "
            f"settings (trainer, model, data), e.g. configs/fmnist/kd.yaml"
        )
    return cfg


def merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in, key by key (dicts merge, other values replace), as on the
    command line: a key ending in ``+`` extends the list under the key without it (``--trainer.callbacks+=``), and
    a mapping naming another ``class_path`` replaces the one it overrides (its ``init_args`` start afresh)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(key, str) and key.endswith("+"):
            if not isinstance(value, list):
                raise ValueError(f"{key!r} extends a list: give a list, got {value!r}")
            existing = out.get(key[:-1]) or []
            if not isinstance(existing, list):
                raise ValueError(f"{key!r} extends a list, but {key[:-1]!r} holds {existing!r}")
            out[key[:-1]] = [*existing, *copy.deepcopy(value)]
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and not _other_class(out[key], value):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _other_class(base: dict[str, Any], override: dict[str, Any]) -> bool:
    """Whether ``override`` names another class than ``base`` (``distill.KDLoss`` and ``KDLoss`` are one)."""
    name = str(override.get("class_path", "")).rsplit(".", 1)[-1]
    return bool(name) and name != str(base.get("class_path", "")).rsplit(".", 1)[-1]


def relocate(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """A copy of ``cfg`` whose logs and checkpoints go to ``out``."""
    cfg = copy.deepcopy(cfg)
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:  # Lightning takes one logger or a list
        if isinstance(logger, dict):
            logger.setdefault("init_args", {})["save_dir"] = str(out)
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(out)
    return cfg


def with_callbacks(cfg: dict[str, Any], *callbacks: dict[str, Any]) -> dict[str, Any]:
    """Append ``callbacks`` (``class_path``/``init_args`` dicts) to the recipe's ``trainer.callbacks``, in place."""
    cfg["trainer"]["callbacks"] = [*(cfg["trainer"].get("callbacks") or []), *callbacks]
    return cfg


def teacher_cache(cache_dir: str | Path) -> dict[str, Any]:
    """The :class:`~distill.cache.TeacherLogitCache` callback writing to ``cache_dir``, as a recipe entry."""
    return {"class_path": "distill.cache.TeacherLogitCache", "init_args": {"cache_dir": str(cache_dir)}}


def job_recipe(recipe: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A job's recipe: the file with ``overrides`` merged in, checked to name a teacher whose file exists."""
    cfg = merge(load_recipe(recipe), overrides)
    check_teacher(cfg, recipe)
    return cfg


def check_teacher(cfg: dict[str, Any], recipe: str) -> None:
    """Fail before any training if the recipe has no teacher or its checkpoint file is missing."""
    check_sections(cfg, recipe)
    teacher = cfg["model"].get("teacher")
    if not teacher:
        given = cfg["model"].get("teacher_checkpoint")
        how = (f"; its model.teacher_checkpoint {given!r} is distill fit's shorthand, which jobs do not read: give it "
               f"as model.teacher: {{class_path: teachers.load_teacher, init_args: {{checkpoint: ...}}}}"
               if given else "")  # fmt: skip
        raise ValueError(f"The job distills from a teacher, but {recipe} sets no model.teacher{how}.")
    missing = [path for path in _inputs(teacher) if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Teacher checkpoint {missing[0]!r} (from {recipe}) does not exist. Train the teacher first, "
            f"e.g. `distill fit --config configs/fmnist/teacher.yaml`, or set its path with overrides."
        )


def check_sections(cfg: dict[str, Any], recipe: str) -> None:
    """Refuse a recipe (after its overrides) whose ``trainer``, ``model`` or ``data`` is not a mapping."""
    for section in ("trainer", "model", "data"):
        if not isinstance(cfg.get(section), dict):
            raise ValueError(
                f"{recipe} (with its overrides) needs {section!r} as a mapping of settings, got "
                f"{cfg.get(section)!r}: see configs/fmnist/kd.yaml"
            )


def build_datamodule(cfg: dict[str, Any], source: str) -> Any:
    """The datamodule of a recipe's ``data`` section, with its augmentation off.

    Used where a student is measured or calibrated outside training (``distill export --int8``); nothing
    else of the recipe (teacher, student) is built.
    """
    data = copy.deepcopy(cfg.get("data"))
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{source} has no data section with a class_path (see configs/fmnist/kd.yaml)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")

    def build() -> Any:
        try:
            return parser.instantiate_classes(parser.parse_object({"data": data})).data
        except Exception as err:  # noqa: BLE001 - jsonargparse and the datamodule raise many kinds
            why = " ".join(str(err.__cause__ or err).split())  # the datamodule's own error, where it raised one
            raise ValueError(f"{source}: its data section does not build: {why}") from None

    datamodule = build()
    random = {"augment": False, "random_erasing": 0.0}  # the settings that make batches random, as attributes
    on = {k: off for k, off in random.items() if getattr(datamodule, k, off) != off}
    if on:
        data.setdefault("init_args", {}).update(on)
        datamodule = build()
    return datamodule


def check_recipe(cfg: dict[str, Any], source: str | None = None) -> tuple[Any, Any]:
    """Build a recipe's model and datamodule and check them against each other, as ``distill fit`` would.

    Jobs call it before they create a run folder or a study, so that a recipe ``distill fit`` would refuse
    (a teacher that does not load or does not fit the data, a bad data or Trainer setting) writes nothing.
    ``source`` (e.g. ``recipe configs/fmnist/kd.yaml``) begins the line of an option it does not know.

    Returns:
        The ``DistillModule`` and the datamodule, set up for fitting.
    """
    with warnings.catch_warnings():  # the job's own argv is in sys.argv; the config given here is the recipe
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        parser = {"prog": "distill fit", "source": source}  # a typo's line names the file and `distill fit --help`
        cli = DistillCLI(args=copy.deepcopy(cfg), run=False, parser_kwargs=parser)  # checks data, models, Trainer
    best = cli.trainer.checkpoint_callback
    _check_best_is_chosen(best is not None and best.monitor is not None, cli.trainer.limit_val_batches)
    if isinstance(cli.datamodule, SplitDataModule):  # each run is tested when it ends: not after its training
        cli.datamodule.setup("test")
        if cli.datamodule.test_set is None:
            raise ValueError(
                f"{type(cli.datamodule).__name__} has no test split, and a job tests each run it trains: give the "
                f"recipe's data a test split (e.g. test_dir)"
            )
    return cli.model, cli.datamodule


def _check_best_is_chosen(monitored: bool, limit_val_batches: Any) -> None:
    if not monitored or limit_val_batches == 0:
        raise ValueError(
            "a job chooses each run's best checkpoint on the validation split: its recipe needs validation batches "
            "and a ModelCheckpoint with a monitor (e.g. val/acc) in trainer.callbacks, as configs/fmnist/kd.yaml has"
        )


def _inputs(node: Any) -> Iterable[str]:
    """The files a recipe reads by path: teacher checkpoints and students loaded from checkpoints."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("checkpoint", "path") and isinstance(value, str):
                yield value
            else:
                yield from _inputs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _inputs(value)


def input_digests(cfg: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every existing file (or folder) the recipe reads by path, so a retrained teacher changes the run."""
    return {path: file_digest(path) for path in sorted(set(_inputs(cfg))) if Path(path).exists()}


def fingerprint(cfg: dict[str, Any]) -> str:
    """SHA-256 of :func:`recipe_identity`: two runs with one fingerprint are the same run."""
    return fingerprints(cfg)[0]


def fingerprints(cfg: dict[str, Any]) -> list[str]:
    """:func:`fingerprint`, then those records written before held of the same recipe (:func:`recipe_identities`,
    and before 2026-12-07, the recipe with every path as spelt)."""
    cfg = what_trains(cfg)
    digests = input_digests(cfg)
    legacy = json.dumps({"recipe": cfg, "inputs": digests}, sort_keys=True, default=str)
    return [hashlib.sha256(text.encode()).hexdigest() for text in (*recipe_identities(cfg, digests), legacy)]


def recipe_identity(cfg: dict[str, Any]) -> str:
    """What makes a recipe the same recipe wherever it and its files lie, as JSON: its settings and each file it
    reads by its contents (its digest), not by its path; not where it writes (its run folder, and the folder of a
    teacher-logit cache, which gives the teacher's own logits). An image folder counts by its listing, not by its
    ``root``. A job's folder, its teacher or its images moved elsewhere run the same recipes."""
    return recipe_identities(cfg)[0]


def recipe_identities(cfg: dict[str, Any], digests: dict[str, str] | None = None) -> list[str]:
    """:func:`recipe_identity`, then the forms records written before 2026-12-07's third session hold: the data's
    ``root`` by its path with the listing of the training and validation images (the second session), then without
    a listing. ``digests``: :func:`input_digests` of ``cfg``, when known."""
    cfg = what_trains(cfg)
    digests = input_digests(cfg) if digests is None else digests
    recipe = relocate(by_contents(cfg, digests), Path("<out>"))
    for callback in recipe["trainer"].get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("TeacherLogitCache"):
            callback.setdefault("init_args", {})["cache_dir"] = "<cache>"
    unlisted = {"recipe": recipe, "inputs": sorted(digests.values())}
    listing = image_identity(cfg)
    forms = [unlisted]
    if listing:  # an image folder's images: other files in the same folder are another run, the same ones elsewhere not
        forms = [{**unlisted, "recipe": without_root(recipe), "images": listing},
                 {**unlisted, "images": {"files": listing["files"]}}, unlisted]  # fmt: skip
    return [json.dumps(form, sort_keys=True, default=str) for form in forms]


def what_trains(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without what only ``distill predict`` reads (an image folder's ``predict_dir``): a recipe given one
    to classify new images is still the recipe a job trained."""
    init_args = (cfg.get("data") or {}).get("init_args")
    if not (isinstance(init_args, dict) and "predict_dir" in init_args):
        return cfg
    cfg = copy.deepcopy(cfg)
    del cfg["data"]["init_args"]["predict_dir"]
    return cfg


def without_root(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` whose data ``root`` is not a path: for a datamodule whose :func:`image_identity` tells its
    images wherever they lie."""
    cfg = copy.deepcopy(cfg)
    init_args = (cfg.get("data") or {}).get("init_args")
    if isinstance(init_args, dict) and "root" in init_args:
        init_args["root"] = "<listed>"
    return cfg


def image_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The images a recipe's datamodule reads where its class does not name them: an image folder's listing
    (:meth:`~distill.data.SplitDataModule.image_identity`). Empty for Fashion-MNIST and CIFAR, and for data that
    does not build (jobs refuse it before they train)."""
    try:
        datamodule = build_datamodule(cfg, "recipe")
    except ValueError:
        return {}
    return datamodule.image_identity() if isinstance(datamodule, SplitDataModule) else {}


def by_contents(node: Any, digests: dict[str, str]) -> Any:
    """``node`` with every path of a file it reads (a key of ``digests``) given as that file's digest."""
    if isinstance(node, dict):
        return {k: by_contents(v, digests) for k, v in node.items()}
    if isinstance(node, list):
        return [by_contents(v, digests) for v in node]
    return f"sha256:{digests[node]}" if isinstance(node, str) and node in digests else node


@dataclass
class FitResult:
    """What one recipe run produced."""

    checkpoint: str
    val_acc: float
    test_acc: float
    teacher_test_acc: float | None
    params: int
    epochs: int
    wall_s: float
    model_name: str


def fit_recipe(cfg: dict[str, Any], config_path: Path | None = None, root: Path | None = None) -> FitResult:
    """Run ``distill fit`` on ``cfg``, write it to ``config_path``, then test the run's best checkpoint.

    ``config_path`` defaults to :func:`sibling_config` of the run's folder (``trainer.default_root_dir``).

    The best checkpoint is the one of the first ``ModelCheckpoint`` (chosen on the validation split);
    the test split is evaluated once, on it. The result is recorded in ``result.json`` in the run's
    folder with the recipe's :func:`fingerprint` and its checkpoint's digest: called again with the same
    recipe and input files (a job resumed after a crash), it returns that result instead of training again.
    ``root``: the run directory of the job that runs the recipe; the record counts paths from it, so that the job's
    folder moved elsewhere reuses its runs (the fingerprint holds no path: see :func:`recipe_identity`).
    """
    stop_if_terminated(None)  # a SIGTERM swallowed since the last Trainer run (torch-pruning's tracing catches all)
    trainer = cfg.get("trainer", {})
    checkpoints = [
        c for c in trainer.get("callbacks") or []
        if isinstance(c, dict) and str(c.get("class_path", "")).endswith("ModelCheckpoint")
    ]  # fmt: skip
    monitored = bool(checkpoints) and bool((checkpoints[0].get("init_args") or {}).get("monitor"))
    _check_best_is_chosen(monitored, trainer.get("limit_val_batches"))  # before it trains, not after it
    folder = trainer.get("default_root_dir")
    record = Path(folder) / "result.json" if folder else None
    keys = fingerprints(cfg)
    if record is not None and record.is_file():
        saved = json.loads(record.read_text())
        if root is not None:
            saved = rerooted(saved, RunState.HERE, str(root.resolve()))
        best = Path(saved.get("result", {}).get("checkpoint", ""))
        same = saved.get("fingerprint") in keys  # or as a record written before held it
        if same and best.is_file() and file_digest(best) == saved.get("checkpoint_digest"):
            print(f"{folder}: already trained with this recipe and these inputs; its result is reused")
            _write_config(cfg, config_path or sibling_config(Path(folder)))  # its paths, where the run now is
            return FitResult(**saved["result"])
    start = time.time()
    with warnings.catch_warnings():  # the job's own argv is in sys.argv; the args given here are the run's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # The folder is the job's own, and the CLI has just saved config.yaml in it: not a stale run
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        cli = DistillCLI(args={"fit": copy.deepcopy(cfg)}, job_phase=True)  # refused input writes nothing
    stop_if_terminated(cli.trainer)
    wall = time.time() - start
    _write_config(cfg, config_path or sibling_config(Path(folder)))
    checkpoint = cli.trainer.checkpoint_callback
    best = checkpoint.best_model_path
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    stop_if_terminated(cli.trainer)
    student = cli.model.student
    teacher_acc = metrics[0].get("test/teacher_acc")
    result = FitResult(
        checkpoint=best,
        val_acc=float(checkpoint.best_model_score),
        test_acc=float(metrics[0]["test/acc"]),
        teacher_test_acc=None if teacher_acc is None else float(teacher_acc),
        params=sum(p.numel() for p in student.parameters()),
        epochs=cli.trainer.current_epoch,
        wall_s=wall,
        model_name=getattr(student, "model_spec", {}).get("name", type(student).__name__).removeprefix("timm/"),
    )
    if record is not None:  # replaces the record of an earlier recipe in the same folder
        saved = {"fingerprint": keys[0], "checkpoint_digest": file_digest(best), "result": asdict(result)}
        saved = saved if root is None else rerooted(saved, str(root.resolve()), RunState.HERE)  # Lightning's realpath
        atomic_write(record, lambda f: json.dump(saved, f, indent=1))
    return result


def _write_config(cfg: dict[str, Any], path: Path) -> None:
    """Write the recipe that ran to ``path`` (unless it holds it already)."""
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text))


def sibling_config(folder: Path) -> Path:
    """``<folder>.yaml`` beside a run folder (``Path.with_suffix`` would cut names like ``T4_alpha0.9_seed0``)."""
    return folder.parent / f"{folder.name}.yaml"
