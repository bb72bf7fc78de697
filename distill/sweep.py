"""``distill sweep``: distill from one teacher over a grid of temperatures (and alphas, seeds).

The best temperature depends on the student: Hinton et al. (2015) found small students prefer
T of about 2.5 to 4, seed 002 reports 1 to 20. Every trial is a full Lightning run of the same recipe
(same data split, same epochs) with another ``KDLoss(temperature, alpha)`` and seed; a CE-only student
per seed is the baseline. The setting is chosen on the validation split; the test accuracy of the
chosen setting is reported, and the test set never chooses anything.

Trials live in an optuna study shared by any number of workers running the same command; each grid
point is trained exactly once (:mod:`distill.study` says how).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from distill.recipes import FitResult, check_recipe, fit_recipe, job_recipe, relocate, teacher_cache, with_callbacks
from distill.report import sweep_report
from distill.rundir import IncompleteRun
from distill.study import finished_rows, missing_points, open_storage, open_study, work

__all__ = ["sweep"]


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
    base = job_recipe(recipe, overrides)
    loss = base["model"].get("loss") if isinstance(base.get("model"), dict) else None
    loss_class = loss.get("class_path") if isinstance(loss, dict) else None
    if loss_class is not None and str(loss_class).rsplit(".", 1)[-1] != "KDLoss":
        raise ValueError(
            f"distill sweep tunes KDLoss's temperature and alpha, but {recipe} trains with {loss_class}: its trials "
            f"would train KDLoss instead. Sweep a recipe whose model.loss is distill.KDLoss."
        )
    space = _grid(temperatures, alphas, seeds, base)
    if heartbeat_interval < 1 or (max_trials is not None and max_trials < 1) or not study_name:
        raise ValueError(
            f"need heartbeat_interval >= 1 second, max_trials >= 1 (or unset) and a study_name; got "
            f"heartbeat_interval={heartbeat_interval}, max_trials={max_trials}, study_name={study_name!r}"
        )
    out = Path(run_dir).resolve()
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

    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the SQLite file goes there
    rdb = open_storage(url, heartbeat_interval)
    ce_space = {"seed": space["seed"]}
    kd = open_study(rdb, url, study_name, space, base)
    ce = open_study(rdb, url, f"{study_name}-ce", ce_space, base) if baseline else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))  # only once it was accepted

    grids = [(kd, space, "kd", lambda params: _run_kd(base, params, out, cache))]
    if ce is not None:
        grids.append((ce, ce_space, "ce", lambda params: _run_ce(base, params, out)))
    announced = False
    while True:
        for study, grid, _, run in grids:
            work(study, grid, run, max_trials)
        running = sum(len(missing_points(study, grid, kind, running_only=True)) for study, grid, kind, _ in grids)
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
    rows = [row for study, grid, kind, _ in grids for row in finished_rows(study, grid, kind)]
    missing = [point for study, grid, kind, _ in grids for point in missing_points(study, grid, kind)]
    rows.sort(key=lambda r: (r["kind"] != "ce", r["temperature"] or 0, r["alpha"], r["seed"]))
    sweep_report(out, rows, settings, missing)
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


# ------------------------------------------------------------------------------- one trial
def _trial_dir(out: Path, kind: str, params: dict[str, Any]) -> Path:
    if kind == "ce":
        return out / "baseline" / f"seed{params['seed']}"
    return out / "trials" / f"T{params['temperature']:g}_alpha{params['alpha']:g}_seed{params['seed']}"


def _run_kd(base: dict[str, Any], params: dict[str, Any], out: Path, cache: str | None) -> FitResult:
    """One KD trial: the recipe with this grid point's temperature, alpha and seed."""
    trial_dir = _trial_dir(out, "kd", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    loss = {"temperature": params["temperature"], "alpha": params["alpha"]}
    cfg["model"]["loss"] = {"class_path": "distill.KDLoss", "init_args": loss}
    if cache is not None:
        with_callbacks(cfg, teacher_cache(cache))
    return fit_recipe(cfg)


def _run_ce(base: dict[str, Any], params: dict[str, Any], out: Path) -> FitResult:
    """The CE-only student of one seed: the recipe without its teacher."""
    trial_dir = _trial_dir(out, "ce", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    cfg["model"].pop("teacher", None)
    cfg["model"]["teacher_checkpoint"] = None
    cfg["model"]["loss"] = {"class_path": "distill.KDLoss", "init_args": {"temperature": 1.0, "alpha": 0.0}}
    return fit_recipe(cfg)
