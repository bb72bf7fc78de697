"""distill sweep on tiny data: results, resuming, killed trials, two workers, bad input."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import start_distill, tiny_kd_recipe

from distill.cli import main
from distill.module import DistillModule
from distill.recipes import FitResult
from distill.study import missing_points, open_storage, open_study, work
from distill.sweep import sweep

ROOT = Path(__file__).parents[1]


def tiny_recipe(tmp_path: Path, teacher: Path, max_epochs: int = 1, limit_train_batches: int = 3) -> Path:
    """kd.yaml shrunk: the tiny StudentNet, a few batches, the given teacher, no warmup."""
    return tiny_kd_recipe(
        tmp_path, teacher, warmup_epochs=0, max_epochs=max_epochs, limit_train_batches=limit_train_batches
    )


def trials(run_dir: Path, name: str = "sweep") -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'sweep.db'}").trials


def completed(run_dir: Path, name: str = "sweep") -> list[tuple]:
    return sorted(tuple(sorted(t.params.items())) for t in trials(run_dir, name) if t.state.name == "COMPLETE")


def test_grid_completes_and_a_rerun_trains_nothing(tmp_path: Path, small_teacher_checkpoint: Path):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint)
    run_dir = tmp_path / "sweep"
    rows = sweep(str(recipe), temperatures=[2.0, 4.0], seeds=[0], run_dir=str(run_dir))

    assert [(r["kind"], r["temperature"], r["seed"]) for r in rows] == [("ce", "", 0), ("kd", 2.0, 0), ("kd", 4.0, 0)]
    with open(run_dir / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {r["kind"] for r in table} == {"kd", "ce"}
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 and 0.0 <= float(r["test_acc"]) <= 1.0 for r in table)
    assert (run_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "sweep.md").read_text()
    assert "| KDLoss | 2 | 0.9 | 1 |" in md and "| KDLoss | 4 | 0.9 | 1 |" in md and "| CE only |" in md
    assert "Best on validation: KDLoss, T=" in md and f"distill sweep --config {run_dir / 'sweep.yaml'}\n" in md
    assert list((run_dir / "cache").glob("*.pt"))  # the teacher's logits were computed once and kept

    before = len(trials(run_dir)), len(trials(run_dir, "sweep-ce"))
    main(["sweep", "--config", str(run_dir / "sweep.yaml")])  # sweep.md's reproduce: resumes, trains nothing
    assert (len(trials(run_dir)), len(trials(run_dir, "sweep-ce"))) == before
    with open(run_dir / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    moved = tmp_path / "moved"  # a sweep moved elsewhere lists its own checkpoints, trains nothing
    run_dir.rename(moved)
    again = sweep(str(recipe), temperatures=[2.0, 4.0], seeds=[0], run_dir=str(moved))
    assert [r["checkpoint"] for r in again] == [r["checkpoint"].replace(str(run_dir), str(moved)) for r in rows]
    assert all(Path(r["checkpoint"]).is_file() for r in again)


def test_a_losses_axis_trains_each_loss_with_the_recipes_settings_of_its_class(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint, limit_train_batches=1)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["model"]["loss"] = {"class_path": "distill.DKDLoss", "init_args": {"temperature": 1.0, "nckd_weight": 2.0}}
    recipe.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "sweep"
    losses = ["KDLoss", "distill.DKDLoss", "LogitStandardKDLoss", "DISTLoss"]
    rows = sweep(str(recipe), temperatures=[2.0], losses=losses, baseline=False, run_dir=str(run_dir))

    assert [(r["loss"], r["temperature"], r["alpha"]) for r in rows] == [
        ("DISTLoss", 2.0, ""),
        ("DKDLoss", 2.0, ""),
        ("KDLoss", 2.0, 0.9),
        ("LogitStandardKDLoss", 2.0, ""),
    ]
    trained = {r["loss"]: DistillModule.load_from_checkpoint(r["checkpoint"], map_location="cpu").loss for r in rows}
    assert {name: type(loss).__name__ for name, loss in trained.items()} == {name: name for name in trained}
    assert all(loss.temperature == 2.0 for loss in trained.values())  # the grid's T, not the recipe's 1.0
    assert trained["DKDLoss"].nckd_weight == 2.0  # the recipe's setting of its own class
    kd, dist, standard = trained["KDLoss"], trained["DISTLoss"], trained["LogitStandardKDLoss"]
    assert (kd.alpha, dist.inter_weight, standard.kd_weight) == (0.9, 2, 9)  # the other classes' defaults
    md = (run_dir / "sweep.md").read_text()
    assert "| DKDLoss | 2 | - | 1 |" in md and "| KDLoss | 2 | 0.9 | 1 |" in md
    with open(run_dir / "sweep.csv") as f:
        assert sorted(r["loss"] for r in csv.DictReader(f)) == sorted(trained)


def test_variants_train_the_same_grid_each_with_its_own_overrides(tmp_path: Path, small_teacher_checkpoint: Path):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint, limit_train_batches=1)
    ema = {"class_path": "distill.EMA", "init_args": {"decay": 0.9}}
    variants = {
        "recipe": {},
        "erasing": {"data": {"init_args": {"random_erasing": 0.5}}},
        "ema": {"trainer": {"callbacks+": [ema]}},  # appended to the recipe's callbacks
    }
    run_dir = tmp_path / "sweep"
    settings = {"recipe": str(recipe), "temperatures": [4.0], "variants": variants, "baseline": False}
    config = tmp_path / "variants.yaml"
    config.write_text(yaml.safe_dump({**settings, "run_dir": str(run_dir)}, sort_keys=False))  # the order matters
    main(["sweep", "--config", str(config)])  # a class_path in a variant stays data (not built by the parser)
    with open(run_dir / "sweep.csv") as f:
        rows = [{**r, "test_acc": float(r["test_acc"])} for r in csv.DictReader(f)]

    assert [r["variant"] for r in rows] == ["recipe", "erasing", "ema"]  # in the order given
    trials_dir = run_dir / "trials"
    trial = {v: yaml.safe_load((trials_dir / v / "KDLoss_T4_alpha0.9_seed0.yaml").read_text()) for v in variants}
    callbacks = {v: [c["class_path"].rsplit(".", 1)[-1] for c in trial[v]["trainer"]["callbacks"]] for v in variants}
    assert callbacks["ema"] == [*callbacks["recipe"][:-1], "EMA", "TeacherLogitCache"]
    assert "ModelCheckpoint" in callbacks["recipe"] and "EMA" not in callbacks["recipe"]
    assert trial["erasing"]["data"]["init_args"]["random_erasing"] == 0.5
    assert trial["recipe"]["data"]["init_args"]["random_erasing"] == 0.0
    ema_checkpoint = torch.load(rows[2]["checkpoint"], weights_only=True)
    assert "current_model_state" in ema_checkpoint  # trained with the average, saved in the student's place
    md = (run_dir / "sweep.md").read_text()
    assert "| variant | loss | T | alpha | seeds | val acc (mean ± std) | test acc (mean ± std) | test vs recipe" in md
    delta = 100 * (rows[1]["test_acc"] - rows[0]["test_acc"])
    assert "| erasing | KDLoss | 4 | 0.9 | 1 | " in md and f"{delta:+.2f} |" in md
    main(["sweep", "--config", str(config), "--wait", "false"])  # run again: the same study, nothing to train
    assert len(trials(run_dir)) == 3
    changed = {**settings, "variants": {**variants, "ema": {}}, "run_dir": str(run_dir)}
    config.write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(SystemExit) as refused:  # a variant's overrides are part of the study
        main(["sweep", "--config", str(config)])
    assert refused.value.code == 2 and len(trials(run_dir)) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperatures": [2.0, 0.0]}, r"Temperatures must be finite and > 0, got \[0.0\]"),
        ({"temperatures": []}, "The grid is empty: give at least one value in temperatures"),
        ({"seeds": []}, "The grid is empty"),
        ({"alphas": [1.5]}, r"Alphas must be in \[0, 1\]"),
        ({"storage": "postgresql://nobody@127.0.0.1:1/nothing"}, "Cannot open the sweep storage"),
        ({"storage": "not a url"}, "Cannot open the sweep storage"),
        ({"overrides": {"model": {"loss": {"class_path": "torch.nn.MSELoss"}}}}, r"trains with torch\.nn\.MSELoss"),
        ({"losses": ["Hinton"]}, "Unknown loss 'Hinton' in losses: choose from DISTLoss, DKDLoss, KDLoss"),
        ({"losses": ["evil.module.KDLoss"]}, "Unknown loss 'evil.module.KDLoss'"),  # was taken as distill's KDLoss
        ({"losses": []}, "The grid is empty: give at least one value in losses"),
        ({"losses": ["KDLoss", "DKDLoss"], "alphas": [0.5, 0.9]}, "which DKDLoss does not have .*sweep several alphas"),
        ({"variants": {"a/b": {}}}, "variant names are folder names"),
        ({"variants": {}}, "variants must map names to overrides"),
        ({"variants": {"dkd": {"model": {"loss": {"class_path": "distill.DKDLoss"}}}}}, "compare losses with the"),
        ({"variants": {"x": {"trainer": {"max_epochs+": [1]}}}}, "'max_epochs\\+' extends a list"),
    ],
)
def test_bad_input(tmp_path: Path, small_teacher_checkpoint: Path, kwargs: dict, match: str):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint)
    options = {"temperatures": [2.0], "run_dir": str(tmp_path / "sweep"), **kwargs}
    with pytest.raises(ValueError, match=match):
        sweep(str(recipe), **options)


def test_missing_teacher_and_changed_grid(tmp_path: Path, small_teacher_checkpoint: Path):
    missing = tiny_recipe(tmp_path, tmp_path / "no_teacher.ckpt")
    with pytest.raises(FileNotFoundError, match=r"Teacher checkpoint .*no_teacher.ckpt.* does not exist\. Train"):
        sweep(str(missing), temperatures=[2.0], run_dir=str(tmp_path / "a"))

    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint)
    run_dir = str(tmp_path / "b")
    sweep(str(recipe), temperatures=[2.0], baseline=False, run_dir=run_dir)
    with pytest.raises(ValueError, match=r"created for the grid .*Use a new run_dir"):
        sweep(str(recipe), temperatures=[2.0, 8.0], baseline=False, run_dir=run_dir)
    with pytest.raises(ValueError, match="created for another recipe"):
        sweep(
            str(recipe), temperatures=[2.0], baseline=False, run_dir=run_dir, overrides={"trainer": {"max_epochs": 2}}
        )


def _worker(config: Path, log: Path) -> subprocess.Popen:
    return start_distill("sweep", "--config", str(config), log=log, threads=1)  # two workers, two cores


@pytest.mark.slow
def test_two_workers_train_each_grid_point_once(tmp_path: Path, small_teacher_checkpoint: Path):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint)
    run_dir = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump({"recipe": str(recipe), "temperatures": [1, 2, 4], "seeds": [0], "run_dir": str(run_dir)})
    )
    workers = [_worker(config, tmp_path / f"worker{i}.log") for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=600) == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]

    kd, ce = completed(run_dir), completed(run_dir, "sweep-ce")
    assert len(kd) == len(set(kd)) == 3 and len(ce) == len(set(ce)) == 1  # every point exactly once
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert all("Written:" in log for log in logs)
    with open(run_dir / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_point_another_worker_just_took_is_not_trained_again(tmp_path: Path):
    """Another worker has started a trial but not yet asked for its parameters (they are recorded then): its
    grid point is taken all the same. Before, this worker trained both points (a CI run caught it)."""
    space = {"seed": [0], "temperature": [1.0, 2.0]}
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = open_study(open_storage(url, heartbeat_interval=30), url, "sweep", space, {})
    other = study.ask()  # the other worker's trial, between its creation and its first suggest_* call
    assert other.params == {} and other.number == 0
    trained = []

    def run(params: dict) -> FitResult:
        trained.append(params["temperature"])
        return FitResult("best.ckpt", 0.5, 0.5, None, 1, 1, 0.0, "studentnet")

    work(study, space, run, max_trials=None)
    assert missing_points(study, space, "kd", running_only=True)  # the worker waits for it, not "incomplete"
    taken = other.suggest_categorical("temperature", space["temperature"])  # the point the other worker trains
    assert trained == [t for t in space["temperature"] if t != taken]


@pytest.mark.slow
def test_a_killed_trial_runs_again(tmp_path: Path, small_teacher_checkpoint: Path):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint, max_epochs=10, limit_train_batches=10)
    run_dir = tmp_path / "sweep"
    settings = {
        "recipe": str(recipe),
        "temperatures": [4],
        "baseline": False,
        "run_dir": str(run_dir),
        "heartbeat_interval": 1,
    }
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(settings))

    def stop_while_training(kill: signal.Signals, log: str) -> int:
        worker = _worker(config, tmp_path / log)
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the trial is training
            metrics = run_dir / "trials" / "recipe" / "KDLoss_T4_alpha0.9_seed0" / "metrics.csv"
            if (run_dir / "sweep.db").exists() and metrics.exists():
                break
            time.sleep(0.2)
        os.killpg(worker.pid, kill)
        return worker.wait()

    # Stopped by SIGTERM (a scheduler): status 143, and its trial failed at once, so the next worker takes it now.
    assert stop_while_training(signal.SIGTERM, "stopped.log") == 143
    assert [t.state.name for t in trials(run_dir)] == ["FAIL"]
    (run_dir / "trials" / "recipe" / "KDLoss_T4_alpha0.9_seed0" / "metrics.csv").unlink()

    # Ctrl-C: Lightning exits with 1 from inside the trial; status 130, and its trial failed at once too.
    assert stop_while_training(signal.SIGINT, "interrupted.log") == 130
    assert [t.state.name for t in trials(run_dir)] == ["FAIL", "FAIL"]
    assert "distill: stopped by Ctrl-C (SIGINT). To resume" in (tmp_path / "interrupted.log").read_text()
    (run_dir / "trials" / "recipe" / "KDLoss_T4_alpha0.9_seed0" / "metrics.csv").unlink()

    # Killed (SIGKILL: no word to optuna): its trial stays RUNNING until its heartbeat is stale.
    stop_while_training(signal.SIGKILL, "killed.log")
    assert [t.state.name for t in trials(run_dir)] == ["FAIL", "FAIL", "RUNNING"]

    # At once, within the heartbeat grace period: the grid is not done, and the report and exit status say so.
    with pytest.raises(SystemExit) as stopped:
        main(["sweep", "--config", str(config), "--wait", "false", "--heartbeat_interval", "60"])  # not stale yet
    assert stopped.value.code == 3
    assert "Incomplete: 1 grid point(s) not finished" in (run_dir / "sweep.md").read_text()
    assert (
        "kd alpha=0.9, loss=KDLoss, seed=0, temperature=4, variant=recipe: running in trial 2"
        in (run_dir / "sweep.md").read_text()
    )
    with open(run_dir / "sweep.csv") as f:
        assert list(csv.DictReader(f)) == []

    # At once again, waiting (the default): the dead worker's trial goes stale and runs here.
    sweep(**settings)
    states = [t.state.name for t in trials(run_dir)]
    assert states.count("FAIL") == 3 and states.count("COMPLETE") == 1
    assert completed(run_dir) == [
        (("alpha", 0.9), ("loss", "KDLoss"), ("seed", 0), ("temperature", 4.0), ("variant", "recipe"))
    ]
    assert "Incomplete" not in (run_dir / "sweep.md").read_text()


def test_a_worker_with_max_trials_does_its_share_and_each_trial_keeps_its_config(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint, limit_train_batches=1)
    options = {"temperatures": [4.0], "seeds": [0, 1], "baseline": False, "run_dir": str(tmp_path / "sweep")}
    assert len(sweep(str(recipe), max_trials=1, **options)) == 1  # its share done: no error, the report says
    assert "Incomplete: 1 grid point(s) not finished" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert len(sweep(str(recipe), **options)) == 2
    for seed in (0, 1):  # "T4_alpha0.9_seed0".with_suffix(".yaml") was "T4_alpha0.yaml" for both
        cfg = yaml.safe_load(
            (tmp_path / "sweep" / "trials" / "recipe" / f"KDLoss_T4_alpha0.9_seed{seed}.yaml").read_text()
        )
        assert cfg["seed_everything"] == seed


def test_a_retrained_teacher_is_another_sweep(tmp_path: Path, small_teacher_checkpoint: Path, teacher_checkpoint):
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(small_teacher_checkpoint, teacher)
    recipe = tiny_recipe(tmp_path, teacher, limit_train_batches=1)
    run_dir = str(tmp_path / "sweep")
    sweep(str(recipe), temperatures=[4.0], baseline=False, run_dir=run_dir)
    shutil.copy(teacher_checkpoint, teacher)  # the same path, other weights
    with pytest.raises(ValueError, match=r"created for other contents of .*teacher.ckpt"):
        sweep(str(recipe), temperatures=[4.0], baseline=False, run_dir=run_dir)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own, started for the test on a free local port; its URL."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL is not installed: `apt-get install postgresql` (.ci/setup installs it)")
    pytest.importorskip("psycopg", reason='the PostgreSQL driver: pip install "psycopg[binary]" (the dev extra has it)')
    bindir = initdb[-1].parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    root = Path(tempfile.mkdtemp(prefix="distill-postgres-"))
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"

    def run(*command: object) -> None:
        subprocess.run([*as_postgres, *map(str, command)], check=True, capture_output=True)

    run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "server.log", "-w", "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "sweeps")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/sweeps"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_one_killed_train_every_point_once(
    tmp_path: Path, small_teacher_checkpoint: Path, postgres: str
):
    recipe = tiny_recipe(tmp_path, small_teacher_checkpoint, max_epochs=3, limit_train_batches=10)
    run_dir = tmp_path / "sweep"
    settings = {"recipe": str(recipe), "temperatures": [1, 2, 4], "baseline": False, "run_dir": str(run_dir)}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**settings, "storage": postgres, "heartbeat_interval": 1}))
    doomed, survivor = (_worker(config, tmp_path / f"{name}.log") for name in ("doomed", "survivor"))
    study = None
    deadline = time.time() + 300
    # Kill the first worker while both train a grid point: each trial holds its five parameters, which
    # it takes after its first heartbeat. (A worker killed between optuna's ask() and that heartbeat
    # leaves a trial with no parameters that optuna never marks failed; its grid point is trained anyway.)
    while time.time() < deadline:
        try:
            study = study or optuna.load_study(study_name="sweep", storage=postgres)
            if sum(t.state.name == "RUNNING" and len(t.params) == 5 for t in study.trials) == 2:
                break
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    done = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(done) == sorted(set(done)) and len(done) == 3  # every grid point trained to the end once
    assert [t.state.name for t in study.trials].count("FAIL") == 1  # the killed worker's, run again
    with open(run_dir / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert "Incomplete" not in (run_dir / "sweep.md").read_text()
    assert yaml.safe_load((run_dir / "sweep.yaml").read_text())["storage"] == postgres  # sweep.md's reproduce
