"""``distill sweep``: distill from one teacher over a grid of temperatures (and alphas, seeds).

The best temperature depends on the student: Hinton et al. (2015) found small students prefer
T of about 2.5 to 4, seed 002 reports 1 to 20. Every trial is a full Lightning run of the same recipe
(same data split, same epochs) with another ``KDLoss(temperature, alpha)`` and seed; a CE-only student
per seed is the baseline. The setting is chosen on the validation split; the test accuracy of the
chosen setting is reported, and the test set never chooses anything.

Trials live in an optuna study (``GridSampler``) in an RDB storage: an SQLite file in the run
directory by default, or any SQLAlchemy URL (PostgreSQL, MySQL) that workers on several machines
share. Any number of workers run the same command; each grid point is trained exactly once:

- the first N trial numbers map one to one to the N grid points (optuna assigns numbers atomically);
- a trial whose worker died stops sending heartbeats, is marked failed after a grace period and
  re-queued with the same grid point (optuna's ``RetryHeartbeatStaleTrialCallback``);
- a grid point whose trial failed is queued again when a worker starts;
- before training, a trial that finds the same grid point completed, or running in a trial with a
  lower number, steps aside (it is recorded as pruned).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

try:
    import fcntl
except ImportError:  # Windows: no file locks; the retries below still cover most races
    fcntl = None

from distill.recipes import (
    FitResult,
    IncompleteRun,
    check_recipe,
    check_sections,
    check_teacher,
    fit_recipe,
    input_digests,
    load_recipe,
    merge,
    relocate,
    sibling_config,
)
from distill.report import atomic_write, save_figure

__all__ = ["SWEEP_FILES", "sweep"]

SWEEP_FILES = ("sweep.csv", "sweep.png", "sweep.md", "sweep.yaml")
_COLUMNS = ("kind", "temperature", "alpha", "seed", "val_acc", "test_acc", "epochs", "wall_s", "trial", "checkpoint")


def sweep(
    recipe: str = "configs/fmnist/kd.yaml",
    temperatures: list[float] | None = None,
    alphas: list[float] | None = None,
    seeds: list[int] | None = None,
    baseline: bool = True,
    overrides: dict[str, Any] | None = None,
    run_dir: str = "runs/sweep",
    storage: str | None = None,
    study_name: str = "sweep",
    cache_teacher_logits: bool = True,
    heartbeat_interval: int = 30,
    max_trials: int | None = None,
    wait: bool = True,
) -> list[dict[str, Any]]:
    """Distill over a grid of temperatures, alphas and seeds; write sweep.csv, sweep.png, sweep.md.

    Run it again to resume: finished trials are skipped, killed or crashed ones run again. Start the
    same command on several GPUs or machines (with a shared ``storage``) to split the grid.

    Args:
        recipe: the KD recipe every trial runs (a ``distill fit`` config with a teacher).
        temperatures: KD temperatures T > 0 (default: 1, 2, 4, 8, 16, 20).
        alphas: weights of the soft term, in [0, 1] (default: the recipe's, or 0.9).
        seeds: seeds; the mean and spread over them are reported (default: 0).
        baseline: also train the CE-only student (no teacher) once per seed.
        overrides: values merged into the recipe for every trial, e.g. ``{"trainer": {"max_epochs": 30}}``
            or ``{"model": {"student": {"init_args": {"width_mult": 0.5}}}}``.
        run_dir: folder for the trials, the study's SQLite file and the results.
        storage: SQLAlchemy URL of the study storage (default: ``sqlite:///<run_dir>/sweep.db``). Use a
            server database (``postgresql://user:pass@host/db``) for workers on several machines.
        study_name: name of the study in the storage (the baseline is ``<study_name>-ce``).
        cache_teacher_logits: compute the teacher's logits once per deterministic split and reuse them
            across trials and epochs (``<run_dir>/cache``). Augmented training splits use the live teacher.
        heartbeat_interval: seconds between a running trial's heartbeats; a trial silent for twice as
            long is treated as killed and queued again.
        max_trials: stop this worker after so many trials (default: until the grid is done).
        wait: once this worker has nothing left to start, wait for the trials other workers are running, and
            run again those whose worker died (silent for ``2 x heartbeat_interval``), until the grid is done.
            With ``False`` it reports what is finished and stops (exit status 3 if the grid is not done); with
            ``max_trials`` it stops after its share (exit status 0; sweep.md lists what is left).

    Returns:
        One row per finished trial (the contents of sweep.csv).

    Raises:
        IncompleteRun: (exit status 3) when grid points are still unfinished at the end and no ``max_trials``
            was given; sweep.csv and sweep.md then hold the finished ones and sweep.md lists the rest.
    """
    import optuna

    base = merge(load_recipe(recipe), overrides)
    check_sections(base, recipe)
    space = _grid(temperatures, alphas, seeds, base)
    if heartbeat_interval < 1 or (max_trials is not None and max_trials < 1) or not study_name:
        raise ValueError(
            f"need heartbeat_interval >= 1 second, max_trials >= 1 (or unset) and a study_name; got "
            f"heartbeat_interval={heartbeat_interval}, max_trials={max_trials}, study_name={study_name!r}"
        )
    out = Path(run_dir).resolve()
    check_teacher(base, recipe)
    check_recipe(base)  # the teacher loads and fits the data: no trial will fail on it
    url = storage or f"sqlite:///{out / 'sweep.db'}"
    settings = {
        "recipe": recipe,
        "temperatures": space["temperature"],
        "alphas": space["alpha"],
        "seeds": space["seed"],
        "baseline": baseline,
        "overrides": overrides or {},
    }
    cache = str(out / "cache") if cache_teacher_logits else None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the SQLite file goes there
    rdb = _storage(url, heartbeat_interval)
    ce_space = {"seed": space["seed"]}
    kd = _study(rdb, url, study_name, space, base)
    ce = _study(rdb, url, f"{study_name}-ce", ce_space, base) if baseline else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))  # only once it was accepted

    grids = [(kd, space, "kd", lambda params: _run_kd(base, params, out, cache))]
    if ce is not None:
        grids.append((ce, ce_space, "ce", lambda params: _run_ce(base, params, out)))
    announced = False
    while True:
        for study, grid, _, run in grids:
            _work(study, grid, run, max_trials)
        running = sum(len(_missing(study, grid, kind, running_only=True)) for study, grid, kind, _ in grids)
        if not wait or max_trials is not None or not running:
            break
        if not announced:
            print(
                f"Waiting for {running} trial(s) running in other workers; a trial whose worker died runs again "
                f"here after {2 * heartbeat_interval} s without a heartbeat.",
                flush=True,
            )
            announced = True
        time.sleep(min(heartbeat_interval, 5))  # the storage is cheap to ask; finish soon after the others
    rows = [row for study, grid, kind, _ in grids for row in _rows(study, grid, kind)]
    missing = [point for study, grid, kind, _ in grids for point in _missing(study, grid, kind)]
    rows.sort(key=lambda r: (r["kind"] != "ce", r["temperature"] or 0, r["alpha"], r["seed"]))
    _write_report(out, rows, settings, missing)
    if missing and max_trials is not None:  # this worker did its share; the report says what is left
        print(f"{len(missing)} grid point(s) left for other workers or a rerun: see {out}/sweep.md", flush=True)
    elif missing:
        raise IncompleteRun(
            f"the sweep is incomplete: {len(missing)} grid point(s) not finished ({'; '.join(missing)}). Results so "
            f"far are in {out}/sweep.md; run the same command again to finish the grid."
        )
    return rows


# ---------------------------------------------------------------------------- input checks
def _grid(
    temperatures: list[float] | None, alphas: list[float] | None, seeds: list[int] | None, cfg: dict[str, Any]
) -> dict[str, list]:
    if temperatures is None:
        temperatures = [1.0, 2.0, 4.0, 8.0, 16.0, 20.0]
    if alphas is None:
        loss = cfg["model"].get("loss")
        init_args = loss.get("init_args") if isinstance(loss, dict) else None
        alphas = [float(init_args.get("alpha", 0.9)) if isinstance(init_args, dict) else 0.9]
    seeds = [0] if seeds is None else seeds
    for name, values in (("temperatures", temperatures), ("alphas", alphas), ("seeds", seeds)):
        if len(values) == 0:
            raise ValueError(f"The grid is empty: give at least one value in {name}.")
    bad_t = [t for t in temperatures if not 0 < t < math.inf]
    if bad_t:
        raise ValueError(f"Temperatures must be finite and > 0, got {bad_t} in {list(temperatures)}.")
    bad_a = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad_a:
        raise ValueError(f"Alphas must be in [0, 1], got {bad_a} in {list(alphas)}.")
    return {
        "temperature": sorted({float(t) for t in temperatures}),
        "alpha": sorted({float(a) for a in alphas}),
        "seed": sorted({int(s) for s in seeds}),
    }


# ------------------------------------------------------------------------ the optuna study
def _storage(url: str, heartbeat_interval: int) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if path is not None and path.exists() and not _sqlite_file(path):  # checked before its lock file is made
        raise ValueError(
            f"The sweep storage {url!r} names {path}, which is not an SQLite database: choose another file"
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
    raise AssertionError("unreachable")


def _sqlite_file(path: Path) -> bool:
    """An SQLite database, or an empty file that SQLite makes one of."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(16) in (b"", b"SQLite format 3\0")


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """An exclusive file lock beside an SQLite storage file (workers on one machine); nothing otherwise."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path is None or fcntl is None or not Path(path).parent.is_dir():
        yield
        return
    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _study(rdb: Any, url: str, name: str, space: dict[str, list], cfg: dict[str, Any]) -> Any:
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        sampler=optuna.samplers.GridSampler(space, seed=0),
        direction="maximize",
        load_if_exists=True,
    )
    fingerprint = {
        "grid": space,
        "recipe": json.dumps(cfg, sort_keys=True, default=str),
        "inputs": input_digests(cfg),  # the teacher checkpoint's bytes: a retrained teacher is another sweep
    }
    # A study where nothing finished or runs (every trial failed: bad input found late) takes the new settings.
    started = any(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in study.get_trials(deepcopy=False))
    for key, value in fingerprint.items():
        stored = study.user_attrs.get(key)
        if stored is None or (stored != value and not started):
            study.set_user_attr(key, value)
        elif stored != value:
            changed = ", ".join(k for k in value if stored.get(k) != value[k]) if key == "inputs" else ""
            what = {
                "grid": f"the grid {stored}",
                "recipe": "another recipe (config or overrides)",
                "inputs": f"other contents of {changed or 'its input files'}",
            }[key]
            raise ValueError(
                f"The study {name!r} in {url} was created for {what}; this run asks for "
                f"{value if key == 'grid' else 'a different one'}. Finished trials would not match. "
                f"Use a new run_dir (or study_name) for the new sweep, or rerun with the original settings."
            )
    return study


def _key(params: dict[str, Any], space: dict[str, list]) -> tuple:
    return tuple(params.get(name) for name in sorted(space))


def _points(space: dict[str, list]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n] for n in names))]


def _work(
    study: Any, space: dict[str, list], run: Callable[[dict[str, Any]], FitResult], max_trials: int | None
) -> None:
    """This worker's share of the grid: trains grid points until none is left to start."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    def states(point: dict[str, Any]) -> set:
        return {t.state for t in study.get_trials(deepcopy=False) if _key(t.params, space) == _key(point, space)}

    with warnings.catch_warnings():  # a killed worker's trial: failed and queued again by the storage callback
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    for point in _points(space):  # a crashed trial: queue its grid point again
        seen = states(point)
        if TrialState.FAIL in seen and not seen & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}:
            study.enqueue_trial(point)

    def left_to_start() -> bool:
        taken = {
            _key(t.params, space)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        }
        return any(_key(p, space) not in taken for p in _points(space))

    def objective(trial: Any) -> float:
        params = {name: trial.suggest_categorical(name, values) for name, values in space.items()}
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number or _key(other.params, space) != _key(params, space):
                continue
            if other.state == TrialState.COMPLETE or (
                other.state == TrialState.RUNNING and other.number < trial.number
            ):
                trial.set_user_attr("duplicate_of", other.number)
                raise optuna.TrialPruned(f"grid point {params} is taken by trial {other.number}")
        result = run(params)
        for key, value in asdict(result).items():
            trial.set_user_attr(key, value)
        return result.val_acc

    def stop_when_done(study: Any, _trial: Any) -> None:
        if not left_to_start():
            study.stop()

    if left_to_start():
        study.optimize(objective, n_trials=max_trials, callbacks=[stop_when_done], gc_after_trial=True)


# ------------------------------------------------------------------------------- one trial
def _trial_dir(out: Path, kind: str, params: dict[str, Any]) -> Path:
    if kind == "ce":
        return out / "baseline" / f"seed{params['seed']}"
    return out / "trials" / f"T{params['temperature']:g}_alpha{params['alpha']:g}_seed{params['seed']}"


def _run_kd(base: dict[str, Any], params: dict[str, Any], out: Path, cache: str | None) -> FitResult:
    trial_dir = _trial_dir(out, "kd", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    loss = {"temperature": params["temperature"], "alpha": params["alpha"]}
    cfg["model"]["loss"] = {"class_path": "distill.KDLoss", "init_args": loss}
    if cache is not None:
        callbacks = cfg["trainer"].setdefault("callbacks", []) or []
        callbacks.append({"class_path": "distill.cache.TeacherLogitCache", "init_args": {"cache_dir": cache}})
        cfg["trainer"]["callbacks"] = callbacks
    return fit_recipe(cfg, sibling_config(trial_dir))


def _run_ce(base: dict[str, Any], params: dict[str, Any], out: Path) -> FitResult:
    trial_dir = _trial_dir(out, "ce", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    cfg["model"].pop("teacher", None)
    cfg["model"]["teacher_checkpoint"] = None
    cfg["model"]["loss"] = {"class_path": "distill.KDLoss", "init_args": {"temperature": 1.0, "alpha": 0.0}}
    return fit_recipe(cfg, sibling_config(trial_dir))


# --------------------------------------------------------------------------------- results
def _rows(study: Any, space: dict[str, list], kind: str) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if _key(t.params, space) not in {_key(p, space) for p in _points(space)}:
            continue
        a = t.user_attrs
        rows.append(
            {
                "kind": kind,
                "temperature": t.params.get("temperature", ""),
                "alpha": t.params.get("alpha", 0.0),
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


def _missing(study: Any, space: dict[str, list], kind: str, running_only: bool = False) -> list[str]:
    """The grid points without a complete trial, each with what became of it (or only the running ones)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    missing = []
    for point in _points(space):
        mine = [t for t in trials if _key(t.params, space) == _key(point, space)]
        if any(t.state == TrialState.COMPLETE for t in mine):
            continue
        running = [t.number for t in mine if t.state == TrialState.RUNNING]
        failed = [t.number for t in mine if t.state == TrialState.FAIL]
        if running_only and not running:
            continue
        status = (
            f"running in trial {running[0]}" if running else f"failed in trial {failed[-1]}" if failed else "not run"
        )
        label = ", ".join(f"{name}={value:g}" for name, value in sorted(point.items()))
        missing.append(f"{kind} {label}: {status}")
    return missing


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict | None, dict | None]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "kd":
            groups.setdefault((r["temperature"], r["alpha"]), []).append(r)
    table = []
    for (t, a), members in sorted(groups.items()):
        val, val_sd = _mean_std([m["val_acc"] for m in members])
        test, test_sd = _mean_std([m["test_acc"] for m in members])
        table.append(
            {
                "temperature": t,
                "alpha": a,
                "n": len(members),
                "val": val,
                "val_sd": val_sd,
                "test": test,
                "test_sd": test_sd,
            }
        )
    best = max(table, key=lambda r: (r["val"], -r["temperature"]), default=None)
    ce_rows = [r for r in rows if r["kind"] == "ce"]
    ce = None
    if ce_rows:
        val, val_sd = _mean_std([r["val_acc"] for r in ce_rows])
        test, test_sd = _mean_std([r["test_acc"] for r in ce_rows])
        ce = {"n": len(ce_rows), "val": val, "val_sd": val_sd, "test": test, "test_sd": test_sd}
    return table, best, ce


def _write_report(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], missing: list[str]) -> None:
    table, best, ce = _summarise(rows)
    atomic_write(out / "sweep.csv", lambda f: _write_csv(f, rows))
    lines = [
        "| T | alpha | seeds | val acc (mean ± std) | test acc (mean ± std) |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['temperature']:g} | {r['alpha']:g} | {r['n']} | {r['val']:.4f} ± {r['val_sd']:.4f} | "
            f"{r['test']:.4f} ± {r['test_sd']:.4f} |"
            for r in table
        ),
    ]
    if ce:
        accuracies = f"{ce['val']:.4f} ± {ce['val_sd']:.4f} | {ce['test']:.4f} ± {ce['test_sd']:.4f}"
        lines.append(f"| CE only | - | {ce['n']} | {accuracies} |")
    text = "\n".join(lines)
    verdict = []
    if missing:
        verdict.append(
            f"**Incomplete: {len(missing)} grid point(s) not finished** ({'; '.join(missing)}); the results below "
            f"are of the finished points only. Run the same command again to finish the grid."
        )
    if best:
        verdict.append(
            f"Best on validation{' so far' if missing else ''}: T={best['temperature']:g}, alpha={best['alpha']:g} "
            f"(val {best['val']:.4f}); its test accuracy: {best['test']:.4f} ± {best['test_sd']:.4f}."
        )
        if ce:
            verdict.append(
                f"Against the CE-only student: {100 * (best['test'] - ce['test']):+.2f} points of test accuracy."
            )
    md = (
        "# Temperature sweep\n\n"
        + text
        + "\n\n"
        + " ".join(verdict)
        + "\n\nThe setting is chosen on the validation split; the test split only reports it.\n\n"
        + "Reproduce (resumes if the run directory exists):\n\n```bash\ndistill sweep --config sweep.yaml\n```\n\n"
        + "with `sweep.yaml`:\n\n```yaml\n"
        + yaml.safe_dump(settings, sort_keys=False)
        + "```\n"
    )
    atomic_write(out / "sweep.md", lambda f: f.write(md))
    _plot(out / "sweep.png", table, ce)
    print("\n" + text + ("\n\n" + " ".join(verdict) if verdict else "") + f"\n\nWritten: {out}/sweep.{{csv,png,md}}")


def _write_csv(f: Any, rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def _plot(path: Path, table: list[dict[str, Any]], ce: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for alpha in sorted({r["alpha"] for r in table}):
        rows = [r for r in table if r["alpha"] == alpha]
        ts = [r["temperature"] for r in rows]
        line = ax.errorbar(
            ts,
            [r["val"] for r in rows],
            yerr=[r["val_sd"] for r in rows],
            marker="o",
            capsize=3,
            label=f"KD val, alpha={alpha:g}",
        )
        ax.errorbar(
            ts,
            [r["test"] for r in rows],
            yerr=[r["test_sd"] for r in rows],
            marker="s",
            capsize=3,
            linestyle="--",
            color=line[0].get_color(),
            alpha=0.7,
            label=f"KD test, alpha={alpha:g}",
        )
    if ce:
        ax.axhline(ce["val"], color="gray", label=f"CE only val ({ce['n']} seeds)")
        ax.axhline(ce["test"], color="gray", linestyle="--", label="CE only test")
        ax.axhspan(ce["test"] - ce["test_sd"], ce["test"] + ce["test_sd"], color="gray", alpha=0.15)
    temperatures = sorted({r["temperature"] for r in table})
    if len(temperatures) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
        ax.minorticks_off()
    ax.set_xlabel("temperature T")
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_title("Knowledge distillation: accuracy vs temperature")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty plot
        ax.legend(fontsize=8)
    save_figure(fig, path)
