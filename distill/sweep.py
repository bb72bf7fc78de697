"""``distill sweep``: distill from one teacher over a grid of losses, temperatures (and alphas, seeds).

The best temperature depends on the student: Hinton et al. (2015) found small students prefer
T of about 2.5 to 4, seed 002 reports 1 to 20. Every trial is a full Lightning run of the same recipe
(same data split, same epochs; a named variant of it where ``variants`` are given) with another loss
(``KDLoss`` or the logit objectives of :mod:`distill.losses`: DKD, logit standardisation, DIST),
temperature, alpha and seed; a CE-only student per seed (the recipe without variants) is the baseline.
The setting is chosen on the validation split; the test accuracy of the chosen setting is reported, and
the test set never chooses anything.

Trials live in an optuna study shared by any number of workers running the same command; each grid
point is trained exactly once (:mod:`distill.study` says how).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from distill import losses as loss_classes
from distill.recipes import (
    FitResult,
    check_recipe,
    check_teacher,
    fit_recipe,
    job_recipe,
    merge,
    relocate,
    teacher_cache,
    with_callbacks,
)
from distill.report import sweep_report
from distill.rundir import IncompleteRun, check_run_dir
from distill.study import finished_rows, missing_points, open_storage, open_study, work

__all__ = ["sweep"]


def sweep(
    recipe: str = "configs/fmnist/kd.yaml",
    temperatures: list[float] | None = None,
    losses: list[str] | None = None,
    alphas: list[float] | None = None,
    seeds: list[int] | None = None,
    baseline: bool = True,
    overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    run_dir: str = "runs/sweep",
    storage: str | None = None,
    study_name: str = "sweep",
    cache_teacher_logits: bool = True,
    heartbeat_interval: int = 30,
    max_trials: int | None = None,
    wait: bool = True,
) -> list[dict[str, Any]]:
    """Distill over a grid of recipe variants, losses, temperatures, alphas and seeds; write sweep.{csv,png,md}.

    Run it again to resume: finished trials are skipped, killed or crashed ones run again. Start the
    same command on several GPUs or machines (with a shared ``storage``) to split the grid.

    Args:
        recipe: the KD recipe every trial runs (a ``distill fit`` config with a teacher).
        temperatures: KD temperatures T > 0 (default: 1, 2, 4, 8, 16, 20), given to every loss.
        losses: the distillation losses to compare, by class name: ``KDLoss``, ``DKDLoss``,
            ``LogitStandardKDLoss``, ``DISTLoss`` (default: the recipe's). Each takes the recipe's settings
            of that class where the recipe trains with it, else its paper's defaults, and the grid's temperature.
        alphas: weights of KDLoss's soft term, in [0, 1] (default: the recipe's, or 0.9); the other losses
            have their own weights, so several alphas need ``losses: [KDLoss]``.
        seeds: seeds; the mean and spread over them are reported (default: 0).
        baseline: also train the CE-only student (no teacher) once per seed.
        overrides: values merged into the recipe for every trial, e.g. ``{"trainer": {"max_epochs": 30}}``
            or ``{"model": {"student": {"init_args": {"width_mult": 0.5}}}}``. A key ending in ``+`` extends a
            list, as ``--trainer.callbacks+=`` does on the command line: ``{"trainer": {"callbacks+": [...]}}``.
        variants: recipe variants to compare, by name: the overrides merged into the recipe (after
            ``overrides``) for that variant's trials, e.g. ``{"recipe": {}, "erasing": {"data": {"init_args":
            {"random_erasing": 0.25}}}}``. Each variant trains every grid point with the same seeds, and the
            report gives each one's difference from the first (default: the recipe alone, named ``recipe``).
            A variant's ``model.loss`` is refused: compare losses with ``losses``.
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
    recipes = _variants(variants, base, recipe)
    space = {"variant": list(recipes), **_grid(temperatures, losses, alphas, seeds, base, recipe)}
    if heartbeat_interval < 1 or (max_trials is not None and max_trials < 1) or not study_name:
        raise ValueError(
            f"need heartbeat_interval >= 1 second, max_trials >= 1 (or unset) and a study_name; got "
            f"heartbeat_interval={heartbeat_interval}, max_trials={max_trials}, study_name={study_name!r}"
        )
    out = Path(run_dir).resolve()
    check_run_dir(out, "sweep")
    for name, cfg in recipes.items():  # the teacher loads and fits the data: no trial will fail on it
        check_recipe(cfg, f"recipe {recipe}" + (f", variant {name}" if variants else "") +
                     (" with its overrides" if overrides else ""))  # fmt: skip
    url = storage or f"sqlite:///{out / 'sweep.db'}"
    _check_storage(storage, out)
    settings = {
        "recipe": recipe,
        "temperatures": space["temperature"],
        "losses": space["loss"],
        "alphas": space["alpha"],
        "seeds": space["seed"],
        "baseline": baseline,
        "overrides": overrides or {},
        "variants": variants,
        "run_dir": str(out),  # sweep.yaml resumes this sweep wherever it is run from
        "study_name": study_name,
    }
    cache = str(out / "cache") if cache_teacher_logits else None

    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the SQLite file goes there
    rdb = open_storage(url, heartbeat_interval)
    ce_space = {"seed": space["seed"]}
    kd = open_study(rdb, url, study_name, space, recipes)
    ce = open_study(rdb, url, f"{study_name}-ce", ce_space, base) if baseline else None
    if storage is not None:  # opened above, so a URL; its password stays out of the run's files
        settings["storage"] = _shown(storage)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))  # only once it was accepted

    grids = [(kd, space, "kd", lambda params: _run_kd(recipes[params["variant"]], params, out, cache))]
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
    for row in rows:  # in this run_dir: a sweep moved or copied elsewhere lists its own files, not the original's
        row["checkpoint"] = str(_trial_dir(out, row["kind"], row) / Path(row["checkpoint"]).name)
    missing = [point for study, grid, kind, _ in grids for point in missing_points(study, grid, kind)]
    order = {name: i for i, name in enumerate(recipes)}
    rows.sort(key=lambda r: (r["kind"] != "ce", order.get(r["variant"], -1), r["loss"], r["temperature"] or 0,
                             r["alpha"] or 0, r["seed"]))  # fmt: skip
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
def _check_storage(storage: str | None, out: Path) -> None:
    """Refuse a storage that would lose the trials or start the grid again over a sweep's files: in memory, another
    storage than the run's, or the run's default ``sweep.db`` gone or emptied."""
    if storage is not None and storage.split("?")[0] in ("sqlite://", "sqlite:///:memory:"):
        raise ValueError(
            "an in-memory sweep storage is lost when the worker ends and no other worker sees it: give a file "
            "(sqlite:///path/sweep.db, the default) or a server database"
        )
    record = out / "sweep.yaml"
    if not record.is_file():
        return
    recorded = (yaml.safe_load(record.read_text()) or {}).get("storage")
    if storage is None and recorded is None:
        db = out / "sweep.db"
        if not db.is_file() or db.stat().st_size == 0:
            raise ValueError(
                f"{out} holds a sweep (sweep.yaml) whose sweep.db is missing or empty: restore it, or use a new "
                f"run_dir (its grid would train again over the trials' files)"
            )
        return
    try:
        shown = None if storage is None else _shown(storage)
    except Exception:  # noqa: BLE001 - not a URL: open_storage says so
        return
    if shown != recorded:
        raise ValueError(
            f"{out} holds a sweep stored in {recorded or 'its sweep.db'}: give that storage again (or none, for "
            f"sweep.db), or use a new run_dir"
        )


def _shown(storage: str) -> str:
    """The storage URL as ``sweep.yaml`` records it: its passwords masked, in the URL and in its query."""
    from sqlalchemy.engine import make_url  # optuna's storage layer

    parsed = make_url(storage)
    query = {k: "***" if "password" in k.lower() else v for k, v in parsed.query.items()}
    return parsed.update_query_dict(query).render_as_string(hide_password=True)


def _grid(
    temperatures: list[float] | None,
    losses: list[str] | None,
    alphas: list[float] | None,
    seeds: list[int] | None,
    cfg: dict[str, Any],
    recipe: str,
) -> dict[str, list]:
    own_path, own_class, own_args = _recipe_loss(cfg)
    if own_class not in loss_classes.__all__:
        raise ValueError(
            f"distill sweep trains the losses of distill.losses ({', '.join(loss_classes.__all__)}), but {recipe} "
            f"trains with {own_path}: its trials would not train the recipe's loss. Sweep a recipe whose "
            f"model.loss is one of them."
        )
    if temperatures is None:
        temperatures = [1.0, 2.0, 4.0, 8.0, 16.0, 20.0]
    losses = [own_class] if losses is None else [_loss_name(name) for name in losses]
    if alphas is None:
        alphas = [float(own_args.get("alpha", 0.9)) if own_class == "KDLoss" else 0.9]
    seeds = [0] if seeds is None else seeds
    for name, values in (("temperatures", temperatures), ("losses", losses), ("alphas", alphas), ("seeds", seeds)):
        if len(values) == 0:
            raise ValueError(f"The grid is empty: give at least one value in {name}.")
    bad_t = [t for t in temperatures if not 0 < t < math.inf]
    if bad_t:
        raise ValueError(f"Temperatures must be finite and > 0, got {bad_t} in {list(temperatures)}.")
    unknown = [name for name in losses if name not in loss_classes.__all__]
    if unknown:
        raise ValueError(f"Unknown loss {unknown[0]!r} in losses: choose from {', '.join(loss_classes.__all__)}.")
    bad_a = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad_a:
        raise ValueError(f"Alphas must be in [0, 1], got {bad_a} in {list(alphas)}.")
    bad_s = [s for s in seeds if not 0 <= s < 2**32]  # the seeds Lightning's seed_everything takes
    if bad_s:
        raise ValueError(f"Seeds must be integers in [0, 2**32), got {bad_s} in {list(seeds)}.")
    others = sorted(set(losses) - {"KDLoss"})
    if len(set(alphas)) > 1 and others:
        raise ValueError(
            f"alphas weigh KDLoss's soft term, which {others[0]} does not have (its settings are the recipe's or "
            f"its defaults): sweep several alphas with losses: [KDLoss] alone."
        )
    return {
        "loss": sorted(set(losses), key=loss_classes.__all__.index),
        "temperature": sorted({float(t) for t in temperatures}),
        "alpha": sorted({float(a) for a in alphas}),
        "seed": sorted({int(s) for s in seeds}),
    }


def _loss_name(name: Any) -> str:
    """``DKDLoss`` for ``DKDLoss``, ``distill.DKDLoss`` or ``distill.losses.DKDLoss``; another path as given."""
    module, _, short = str(name).rpartition(".")
    return short if module in ("", "distill", "distill.losses") else str(name)


def _variants(variants: dict[str, Any] | None, base: dict[str, Any], recipe: str) -> dict[str, dict[str, Any]]:
    """Each variant's recipe: ``base`` with the variant's overrides merged in, checked like the recipe."""
    if variants is None:
        return {"recipe": base}
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"variants must map names to overrides, e.g. {{recipe: {{}}, ema: {{...}}}}; got {variants!r}")
    recipes = {}
    for name, changes in variants.items():
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
            raise ValueError(f"variant names are folder names (letters, digits, '-', '_', '.'); got {name!r}")
        if changes is not None and not isinstance(changes, dict):
            raise ValueError(f"variant {name!r} must be a mapping of overrides, got {changes!r}")
        if not isinstance((changes or {}).get("model", {}), dict):
            raise ValueError(f"variant {name!r}: model must be a mapping of overrides, got {changes['model']!r}")
        if "loss" in ((changes or {}).get("model") or {}):
            raise ValueError(f"variant {name!r} sets model.loss: compare losses with the losses axis instead")
        recipes[name] = merge(base, changes)
        check_teacher(recipes[name], f"{recipe} (variant {name!r})")
    return recipes


def _recipe_loss(cfg: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The recipe's ``model.loss``: its class path, class name and init args (``DistillModule``'s KDLoss if unset)."""
    loss = cfg["model"].get("loss") if isinstance(cfg.get("model"), dict) else None
    loss = {"class_path": loss} if isinstance(loss, str) else loss
    if not (isinstance(loss, dict) and loss.get("class_path")):
        loss = {"class_path": "distill.KDLoss"}
    return loss["class_path"], _loss_name(loss["class_path"]), dict(loss.get("init_args") or {})


# ------------------------------------------------------------------------------- one trial
def _trial_dir(out: Path, kind: str, params: dict[str, Any]) -> Path:
    if kind == "ce":
        return out / "baseline" / f"seed{params['seed']}"
    alpha = f"_alpha{params['alpha']:g}" if params["loss"] == "KDLoss" else ""
    name = f"{params['loss']}_T{params['temperature']:g}{alpha}_seed{params['seed']}"
    return out / "trials" / params["variant"] / name


def _run_kd(base: dict[str, Any], params: dict[str, Any], out: Path, cache: str | None) -> FitResult:
    """One distillation trial: the recipe with this grid point's loss, temperature, alpha and seed."""
    trial_dir = _trial_dir(out, "kd", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    _, own_class, own_args = _recipe_loss(base)
    init_args = own_args if own_class == params["loss"] else {}
    init_args["temperature"] = params["temperature"]
    if params["loss"] == "KDLoss":
        init_args["alpha"] = params["alpha"]
    cfg["model"]["loss"] = {"class_path": f"distill.{params['loss']}", "init_args": init_args}
    if cache is not None:
        with_callbacks(cfg, teacher_cache(cache))
    return fit_recipe(cfg, root=out)


def _run_ce(base: dict[str, Any], params: dict[str, Any], out: Path) -> FitResult:
    """The CE-only student of one seed: the recipe without its teacher."""
    trial_dir = _trial_dir(out, "ce", params)
    cfg = relocate(base, trial_dir)
    cfg["seed_everything"] = params["seed"]
    cfg["model"].pop("teacher", None)
    cfg["model"]["teacher_checkpoint"] = None
    cfg["model"]["loss"] = {"class_path": "distill.KDLoss", "init_args": {"temperature": 1.0, "alpha": 0.0}}
    return fit_recipe(cfg, root=out)
