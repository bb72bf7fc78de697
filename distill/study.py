"""The sweep's optuna study: its storage, and how workers share its grid.

Trials live in an optuna study (``GridSampler``) in an RDB storage: an SQLite file in the run
directory by default, or any SQLAlchemy URL (PostgreSQL, MySQL) that workers on several machines
share. Any number of workers run the same command; each grid point is trained exactly once:

- the first N trial numbers map one to one to the N grid points (optuna assigns numbers atomically);
- a trial whose worker died stops sending heartbeats, is marked failed after a grace period and
  re-queued with the same grid point (optuna's ``RetryHeartbeatStaleTrialCallback``);
- a grid point whose trial failed is queued again when a worker starts;
- before training, a trial that finds the same grid point completed, or running in a trial with a
  lower number, steps aside (it is recorded as pruned).

optuna is imported where it is used: it is needed by ``distill sweep`` only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.recipes import FitResult, by_contents, image_identity, input_digests, what_trains, without_root
from distill.rundir import file_lock

__all__ = ["finished_rows", "missing_points", "open_storage", "open_study", "work"]


def open_storage(url: str, heartbeat_interval: int) -> Any:
    """The optuna RDB storage at ``url``, its tables created once even when workers start together."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = _sqlite_path(url)
    if path is not None and path.exists() and not _sqlite_file(path):  # checked before its lock file is made
        raise ValueError(
            f"The sweep storage {url!r} names {path}, which is not an SQLite database: choose another file"
        )
    damage = _sqlite_damage(path) if path is not None else None
    if damage is not None:  # optuna would fail mid-query, after the worker had started
        raise ValueError(
            f"The sweep storage {path} is damaged (SQLite: {damage}): restore it from a copy, or use a new run_dir "
            f"(the finished trials' results stay in trials/)."
        )
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with _creation_lock(url):  # workers started together would race to create the tables
        for attempt in range(5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    return RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=2 * heartbeat_interval,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                    )
                except Exception as err:  # noqa: BLE001 - drivers raise many kinds; all mean "cannot open"
                    message = str(err)
                    racing = any(s in message for s in ("already exists", "UNIQUE constraint", "database is locked"))
                    if racing and attempt < 4:  # another machine creating the same server database
                        time.sleep(0.5 + random.random())
                        continue
                    raise ValueError(
                        f"Cannot open the sweep storage {url!r}: {type(err).__name__}: {message.splitlines()[0]}. "
                        f"Check the URL, the server and its driver (PostgreSQL: postgresql+psycopg:// with "
                        f"pip install 'psycopg[binary]'), "
                        f"or leave storage unset for an SQLite file in the run directory."
                    ) from None


def _sqlite_file(path: Path) -> bool:
    """An SQLite database, or an empty file that SQLite makes one of."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(16) in (b"", b"SQLite format 3\0")


def _sqlite_damage(path: Path) -> str | None:
    """What SQLite's ``quick_check`` finds wrong in the database file at ``path``; ``None`` if it is sound (or new)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            found = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.OperationalError:  # locked, or a hot journal a read-only look cannot roll back: optuna's open can
        return None
    except sqlite3.DatabaseError as err:  # malformed, or not a database
        return str(err)
    return None if found == ["ok"] else "; ".join(" ".join(line.split()) for line in found[:3])


def _creation_lock(url: str) -> contextlib.AbstractContextManager:
    """An exclusive file lock beside an SQLite storage file (workers on one machine; no file locks on Windows:
    the retries in ``open_storage`` still cover most races); nothing otherwise."""
    path = _sqlite_path(url)
    return file_lock(path) if path is not None else contextlib.nullcontext()


def _sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL as SQLAlchemy reads it (``%3F`` decoded, ``?mode=ro`` a query, not part of the
    name), so that every spelling of one database takes one lock; ``None`` for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:  # noqa: BLE001 - not a URL: RDBStorage says so
        return None
    return Path(database) if database and database != ":memory:" else None


def open_study(rdb: Any, url: str, name: str, space: dict[str, list], cfg: dict[str, Any]) -> Any:
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        sampler=optuna.samplers.GridSampler(space, seed=0),
        direction="maximize",
        load_if_exists=True,
    )
    one = "class_path" in (cfg.get("data") or {})  # one recipe, or its variants by name
    cfg = what_trains(cfg) if one else {name: what_trains(recipe) for name, recipe in cfg.items()}
    variants = {"recipe": cfg} if one else cfg
    digests = input_digests(cfg)  # the teacher checkpoint's bytes: a retrained teacher is another sweep
    images = {name: image_identity(recipe) for name, recipe in variants.items()}
    # Each file by its digest and an image folder by its listing, not by their paths: workers that find them
    # elsewhere (a copy on each cluster node) take up the same study.
    recipes = {name: by_contents(without_root(r) if images[name] else r, digests) for name, r in variants.items()}
    fingerprint = {  # in the order checked: a retrained teacher is named as such, not as another recipe
        "grid": space,
        "inputs": digests,
        "recipe": json.dumps(recipes["recipe"] if one else recipes, sort_keys=True, default=str),
    }
    earlier = {"recipe": json.dumps(cfg, sort_keys=True, default=str)}  # as studies before 2026-12-07's third session
    if any(images.values()):  # image folders: other files in the same folder are another sweep
        fingerprint["images"] = images
        earlier["images"] = {name: {"files": listing["files"]} if listing else {} for name, listing in images.items()}
    # A study where nothing finished or runs (every trial failed: bad input found late) takes the new settings.
    started = any(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in study.get_trials(deepcopy=False))
    for key, value in fingerprint.items():
        stored = study.user_attrs.get(key)
        if stored is None or (stored != value and not started):
            study.set_user_attr(key, value)
        elif key == "grid" and set(stored) != set(value):  # an axis added since (variant, loss: issue 17)
            raise ValueError(
                f"The study {name!r} in {url} was made by an earlier distill sweep, whose grid has the axes "
                f"{', '.join(sorted(stored))} (now {', '.join(sorted(value))}): its trials cannot be taken up. Use a "
                f"new run_dir (or study_name); the old results stay in that folder's sweep.csv."
            )
        elif stored != value and stored != earlier.get(key) and not _same_files(key, stored, value):
            changed = [k for k in value if stored.get(k) != value[k]] if key in ("inputs", "images") else []
            if key == "grid":
                what = f"the grid {stored}"
            elif key == "recipe":
                what = "another recipe (config or overrides)"
            elif key == "inputs":
                what = f"other contents of {', '.join(changed) or 'its input files'}"
            else:  # an image folder's listing, by variant
                what = (
                    "other images ("
                    + "; ".join(f"{k}: {_listed(stored.get(k))}; now {_listed(value.get(k))}" for k in changed)
                    + ")"
                )
            raise ValueError(
                f"The study {name!r} in {url} was created for {what}; this run asks for "
                f"{value if key == 'grid' else 'a different one'}. Finished trials would not match. "
                f"Use a new run_dir (or study_name) for the new sweep, or rerun with the original settings."
            )
    return study


def _listed(listing: dict[str, str] | None) -> str:
    """An image folder's listing, as a study recorded it, in words."""
    named = {"test_files": "test split "}
    return ", ".join(f"{named.get(key, '')}{text}" for key, text in (listing or {}).items()) or "no listing"


def _same_files(key: str, stored: Any, value: Any) -> bool:
    """Whether a study's recorded input files are the ones given: the same contents, wherever they lie."""
    return key == "inputs" and sorted(stored.values()) == sorted(value.values())


def _key(params: dict[str, Any], space: dict[str, list]) -> tuple:
    return tuple(params.get(name) for name in sorted(space))


def _trial_key(trial: Any, sampler: Any, space: dict[str, list]) -> tuple | None:
    """The grid point a trial trains, known from its creation: a running trial's parameters are recorded only
    when its objective asks for them, so another worker that looked in between took the point as free and
    trained it too. Before that, the point is the one queued with it (``fixed_params``) or the one
    ``GridSampler`` gave it (``grid_id``, an index into its shuffled grid)."""
    if all(name in trial.params for name in space):
        return _key(trial.params, space)
    fixed = trial.system_attrs.get("fixed_params")
    if fixed is not None:
        return _key(fixed, space)
    grid_id = trial.system_attrs.get("grid_id")
    if grid_id is not None and hasattr(sampler, "_all_grids"):
        return _key(dict(zip(sampler._param_names, sampler._all_grids[grid_id], strict=True)), space)
    return None


def _points(space: dict[str, list]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n] for n in names))]


def work(
    study: Any, space: dict[str, list], run: Callable[[dict[str, Any]], FitResult], max_trials: int | None
) -> None:
    """This worker's share of the grid: trains grid points until none is left to start."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    def point_of(t: Any) -> tuple | None:
        return _trial_key(t, study.sampler, space)

    def states(point: dict[str, Any]) -> set:
        return {t.state for t in study.get_trials(deepcopy=False) if point_of(t) == _key(point, space)}

    with warnings.catch_warnings():  # a killed worker's trial: failed and queued again by the storage callback
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    for point in _points(space):  # a crashed trial: queue its grid point again
        seen = states(point)
        if TrialState.FAIL in seen and not seen & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}:
            study.enqueue_trial(point)

    def left_to_start() -> bool:
        started = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        taken = {point_of(t) for t in started}
        return any(_key(p, space) not in taken for p in _points(space))

    def objective(trial: Any) -> float:
        try:  # a SIGTERM may come while the trial runs or while it looks at the others (distill.cli stops there too)
            params = {name: trial.suggest_categorical(name, values) for name, values in space.items()}
            for other in study.get_trials(deepcopy=False):
                if other.number == trial.number or point_of(other) != _key(params, space):
                    continue
                if other.state == TrialState.COMPLETE or (
                    other.state == TrialState.RUNNING and other.number < trial.number
                ):
                    trial.set_user_attr("duplicate_of", other.number)
                    raise optuna.TrialPruned(f"grid point {params} is taken by trial {other.number}")
            result = run(params)
        except (SIGTERMException, SystemExit):  # SIGTERM, and Ctrl-C in a Trainer run (Lightning exits with 1):
            study.tell(trial, state=TrialState.FAIL)  # optuna would leave it RUNNING until its heartbeat is stale,
            raise  # and a rerun would wait for it; now the next worker queues it again at once
        for key, value in asdict(result).items():
            trial.set_user_attr(key, value)
        return result.val_acc

    def stop_when_done(study: Any, _trial: Any) -> None:
        if not left_to_start():
            study.stop()

    if left_to_start():
        study.optimize(objective, n_trials=max_trials, callbacks=[stop_when_done], gc_after_trial=True)


# --------------------------------------------------------------------------------- results
def finished_rows(study: Any, space: dict[str, list], kind: str) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if _key(t.params, space) not in {_key(p, space) for p in _points(space)}:
            continue
        a = t.user_attrs
        rows.append(
            {
                "kind": kind,
                "variant": t.params.get("variant", ""),
                "loss": t.params.get("loss", ""),
                "temperature": t.params.get("temperature", ""),
                "alpha": t.params["alpha"] if t.params.get("loss") == "KDLoss" else "",  # the others have none
                "seed": t.params["seed"],
                "val_acc": a["val_acc"],
                "test_acc": a["test_acc"],
                "epochs": a["epochs"],
                "wall_s": round(a["wall_s"], 1),
                "trial": t.number,
                "checkpoint": a["checkpoint"],
            }
        )
    return rows


def missing_points(study: Any, space: dict[str, list], kind: str, running_only: bool = False) -> list[str]:
    """The grid points without a complete trial, each with what became of it (or only the running ones)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    missing = []
    for point in _points(space):
        mine = [t for t in trials if _trial_key(t, study.sampler, space) == _key(point, space)]
        if any(t.state == TrialState.COMPLETE for t in mine):
            continue
        running = [t.number for t in mine if t.state == TrialState.RUNNING]
        failed = [t.number for t in mine if t.state == TrialState.FAIL]
        if running_only and not running:
            continue
        status = (
            f"running in trial {running[0]}" if running else f"failed in trial {failed[-1]}" if failed else "not run"
        )
        label = ", ".join(
            f"{name}={value if isinstance(value, str) else format(value, 'g')}" for name, value in sorted(point.items())
        )
        missing.append(f"{kind} {label}: {status}")
    return missing
