"""Resuming ``distill fit``: a run killed mid-epoch and resumed from last.ckpt is the run it replaces."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import start_distill, tiny_kd_recipe
from pytorch_lightning.callbacks import ModelCheckpoint

from distill.cli import main
from distill.lightning_cli import stale_last_checkpoints
from distill.recipes import merge, relocate
from distill.rundir import file_digest

ROOT = Path(__file__).parents[1]


# Issue 17's recipe levers, all on: random augmentation, mixup/cutmix (random per batch), an EMA of the
# student (state of its own in the checkpoint) and DKD (a loss ramped in by epoch).
LEVERS = {
    "data": {"init_args": {"augment": True, "random_erasing": 0.5}},
    "model": {
        "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        "loss": {"class_path": "distill.DKDLoss", "init_args": {"warmup_epochs": 3}},
    },
}
EMA = {"class_path": "distill.EMA", "init_args": {"decay": 0.9}}


def recipe(tmp_path: Path, teacher: Path, name: str, epochs: int = 4, levers: bool = False) -> Path:
    """The tiny KD recipe writing into ``tmp_path/name``, with epochs long enough to be killed in."""
    cfg = yaml.safe_load(tiny_kd_recipe(tmp_path, teacher, limit_train_batches=60, max_epochs=epochs).read_text())
    if levers:
        cfg = merge(cfg, LEVERS)
        cfg["trainer"]["callbacks"].append(EMA)
    cfg = relocate(cfg, tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def relocate_checkpoints(cfg: dict, folder: Path) -> dict:
    """``cfg`` with its ModelCheckpoints writing into ``folder``."""
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(folder)
    return cfg


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the student, and with an EMA the raw weights and the average's state too."""
    checkpoint = torch.load(path, weights_only=True)
    states = ("state_dict", "current_model_state", "averaging_state")
    return {f"{s}.{k}": v for s in states for k, v in checkpoint.get(s, {}).items() if isinstance(v, torch.Tensor)}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize(("levers", "kill"), [(False, signal.SIGKILL), (True, signal.SIGTERM)], ids=["kd", "levers"])
def test_a_fit_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(
    tmp_path: Path, small_teacher_checkpoint, levers: bool, kill: signal.Signals
):
    """Killed (SIGKILL: the OOM killer, a lost machine) or stopped (SIGTERM: ``kill``, ``timeout``, a scheduler,
    which Lightning turns into a clean stop with exit status 0, and ``distill`` into 143 and one line)."""
    main(["fit", "--config", str(recipe(tmp_path, small_teacher_checkpoint, "whole", levers=levers))])

    config = recipe(tmp_path, small_teacher_checkpoint, "killed", levers=levers)
    log = tmp_path / "killed.log"
    worker = start_distill("fit", "--config", str(config), log=log)
    last = tmp_path / "killed" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline:  # the first epoch's checkpoint is written: the second epoch is running
        if last.is_file() and worker.poll() is None:
            try:
                if torch.load(last, weights_only=True)["epoch"] == 0:
                    break
            except (RuntimeError, EOFError):  # caught while Lightning writes it
                pass
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(worker.pid, kill)
    if kill == signal.SIGKILL:
        assert worker.wait() == -signal.SIGKILL  # killed, not finished
    else:  # a failure to the shell, a scheduler, `&&`: not the success Lightning's status 0 would claim
        assert worker.wait() == 128 + signal.SIGTERM
        assert log.read_text().splitlines()[-1].startswith("distill: stopped by SIGTERM. To resume")
    assert torch.load(last, weights_only=True)["epoch"] < 3

    main(["fit", "--config", str(config), "--ckpt_path", "last"])  # Lightning finds last.ckpt
    a, b = weights(tmp_path / "whole" / "last.ckpt"), weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(k.startswith("current_model_state.") for k in a) == levers  # the EMA's raw weights compared too
    whole, resumed = rows(tmp_path / "whole" / "metrics.csv"), rows(tmp_path / "killed" / "metrics.csv")
    assert {r["epoch"] for r in whole} == {"", "0", "1", "2", "3"} and resumed == whole  # every row, none twice


def test_a_recipe_named_config_yaml_beside_its_checkpoints_folder_trains(tmp_path: Path, small_teacher_checkpoint):
    """A project's own ``config.yaml`` beside the ``checkpoints/`` its fit writes is no other run's folder (a run
    holds its logs beside its config: tests/test_faults.py refuses a fit into such a folder's checkpoints)."""
    (tmp_path / "project").mkdir()
    cfg = yaml.safe_load(recipe(tmp_path, small_teacher_checkpoint, "project/logs", epochs=1).read_text())
    cfg = relocate_checkpoints(cfg, tmp_path / "project" / "checkpoints")
    config = tmp_path / "project" / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
    assert (tmp_path / "project" / "checkpoints" / "last.ckpt").is_file() and yaml.safe_load(config.read_text()) == cfg


def test_a_versioned_logger_does_not_let_a_new_run_replace_the_checkpoints_of_the_one_before(
    tmp_path: Path, small_teacher_checkpoint, capsys: pytest.CaptureFixture
):
    """A logger that starts a version per run, the checkpoints in a folder of their own under names without
    Lightning's ``-v1`` (the recipes' ``enable_version_counter: false``): the second run would replace the first's."""
    cfg = yaml.safe_load(recipe(tmp_path, small_teacher_checkpoint, "logs", epochs=1).read_text())
    cfg = relocate_checkpoints(cfg, tmp_path / "checkpoints")
    cfg["trainer"]["logger"]["init_args"]["version"] = None  # version_0, version_1, ...
    config = tmp_path / "versioned.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
    before = {path.name: file_digest(str(path)) for path in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in before and (tmp_path / "logs" / "version_0" / "config.yaml").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "holds the checkpoints of an earlier run, and replace them" in line
    assert {path.name: file_digest(str(path)) for path in (tmp_path / "checkpoints").iterdir()} == before
    assert not (tmp_path / "logs" / "version_1").exists()
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2"])  # resumed: it may


def test_a_monitored_checkpoints_save_last_alone_is_warned_of_as_its_last_ckpt_stays_at_the_best_epoch(
    tmp_path: Path, small_teacher_checkpoint
):
    """README's image-folder recipe had it: Lightning writes such a last.ckpt only with a better checkpoint, so a
    resume with --ckpt_path last went back to that epoch and trained the ones after it again, replacing their rows."""
    cfg = yaml.safe_load(recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1).read_text())
    checkpoints = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    best, last = sorted(checkpoints, key=lambda c: "monitor" not in c["init_args"])
    assert (best["init_args"]["filename"], last["init_args"]["filename"]) == ("best", "last")
    assert (
        stale_last_checkpoints(
            [ModelCheckpoint(**best["init_args"], save_last=True), ModelCheckpoint(**last["init_args"])]
        )
        == []
    )  # fmt: skip  (the recipes' way)
    cfg["trainer"]["callbacks"].remove(last)
    best["init_args"]["save_last"] = True
    config = tmp_path / "save_last.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.warns(
        UserWarning, match=r"ModelCheckpoint\(monitor='val/acc', save_last=True\) writes last.ckpt only"
    ) as said:
        main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
    assert not [w for w in said if "exists and is not empty" in str(w.message)]  # the first fit's noise, not said


def test_a_rerun_with_lightnings_version_counter_is_refused_as_it_would_leave_best_ckpt_to_the_run_before(
    tmp_path: Path, small_teacher_checkpoint, capsys: pytest.CaptureFixture
):
    """Fixed names with Lightning's default ``enable_version_counter: true``: a second fit replaced config.yaml and
    metrics.csv but wrote ``best-v1.ckpt``, so ``best.ckpt`` (which the next steps load) held the first run's."""
    for where in ("run", "default"):  # the ModelCheckpoints in the run's folder, or Lightning's <log_dir>/checkpoints
        cfg = yaml.safe_load(recipe(tmp_path, small_teacher_checkpoint, where, epochs=1).read_text())
        for callback in cfg["trainer"]["callbacks"]:
            if callback["class_path"].endswith("ModelCheckpoint"):
                del callback["init_args"]["enable_version_counter"]
                if where == "default":
                    del callback["init_args"]["dirpath"]
        config = tmp_path / f"{where}_counted.yaml"
        config.write_text(yaml.safe_dump(cfg))
        main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
        before = {path.name: file_digest(str(path)) for path in (tmp_path / where).rglob("*") if path.is_file()}
        assert {"best.ckpt", "last.ckpt", "config.yaml", "metrics.csv"} <= set(before)
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2", "--model.lr", "0.05"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and "is an earlier run's checkpoint: this fit would replace the config.yaml" in line
        assert "Set enable_version_counter: false on the ModelCheckpoint" in line
        assert {path.name: file_digest(str(path)) for path in (tmp_path / where).rglob("*") if path.is_file()} == before
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2"])  # resumed: it may


def test_a_new_fit_stopped_before_its_first_checkpoint_leaves_the_earlier_run_and_after_it_its_own(
    tmp_path: Path, small_teacher_checkpoint
):
    """A new fit replaces the run in its folder once it saved a checkpoint; stopped before (here by Ctrl-C in its first
    epoch), the earlier run's records are put back, so its checkpoints are not left beside this run's config."""
    config = recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1)
    main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])

    def files() -> dict[str, str]:
        return {path.name: file_digest(str(path)) for path in (tmp_path / "run").iterdir()}

    earlier = files()
    ctrl_c = ["--trainer.callbacks+=helpers.PressCtrlC", "--model.lr", "0.05", "--trainer.limit_train_batches", "2"]
    with pytest.raises(SystemExit) as stop:  # in its first epoch: nothing of it is kept
        main(["fit", "--config", str(config), *ctrl_c])
    assert stop.value.code == 130 and files() == earlier
    with pytest.raises(SystemExit) as stop:  # in its second: it saved its checkpoints, it is the run now
        main(["fit", "--config", str(config), *ctrl_c, "--trainer.callbacks.epoch", "1", "--trainer.max_epochs", "2"])
    assert stop.value.code == 130
    now = files()
    assert all(now[name] != earlier[name] for name in ("best.ckpt", "last.ckpt", "config.yaml", "hparams.yaml"))
    assert "lr: 0.05" in (tmp_path / "run" / "config.yaml").read_text()


def test_ctrl_c_stops_a_fit_or_an_export_with_status_130_and_the_line_that_resumes_it(
    tmp_path: Path, small_teacher_checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Lightning turns Ctrl-C in a Trainer run into a graceful shutdown and ``sys.exit(1)``, a failure with no word
    of what to do; outside one (an export) it is a KeyboardInterrupt and its traceback."""
    import distill.export

    config = recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--trainer.callbacks+=helpers.PressCtrlC"])
    assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    words = "distill: stopped by Ctrl-C (SIGINT). To resume, run the same command again with --ckpt_path last"
    assert capsys.readouterr().err.splitlines()[-1].startswith(words)

    def ctrl_c(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(distill.export, "export_onnx", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        main(["export", str(small_teacher_checkpoint), "--onnx", str(tmp_path / "student.onnx")])
    assert stop.value.code == 130 and not (tmp_path / "student.onnx").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "distill: stopped by Ctrl-C (SIGINT). To resume, run the same command again (what it had not finished was not "
        "written)"
    )


def test_evaluating_in_the_training_folder_keeps_its_metrics_and_config(
    tmp_path: Path, small_teacher_checkpoint, capsys: pytest.CaptureFixture
):
    config = recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1)
    main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"])
    run = tmp_path / "run"
    trained, saved = rows(run / "metrics.csv"), hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        main(["test", "--config", str(config), "--ckpt_path", str(run / "best.ckpt")])
        main(["validate", "--config", str(config), "--ckpt_path", str(run / "best.ckpt")])
    assert not [w for w in said if "will be deleted" in str(w.message)]  # Lightning's: the rows are kept, below
    after = rows(run / "metrics.csv")  # with the evaluations' columns added
    assert [{k: r[k] for k in trained[0]} for r in after[: len(trained)]] == trained  # the training's rows first
    assert "test/acc" in after[len(trained)] and after[-1].get("val/acc")
    assert hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest() == saved  # still the training's config

    # Another run's checkpoint: refused there (tests/test_faults.py), but its predictions may go to a file of their own.
    other = yaml.safe_load(config.read_text())
    other["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "other" / "logs")  # its checkpoints elsewhere
    other["model"]["lr"] = 2 * other["model"].get("lr", 0.01)  # its hparams.yaml differs
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(relocate_checkpoints(other, tmp_path / "other" / "checkpoints")))
    main(["fit", "--config", str(other_config), "--trainer.limit_train_batches", "2"])
    main(["test", "--config", str(other_config), "--ckpt_path", str(tmp_path / "other" / "checkpoints" / "best.ckpt")])
    predict = ["predict", "--config", str(config), "--ckpt_path", str(tmp_path / "other" / "checkpoints" / "best.ckpt")]
    predict += ["--trainer.limit_predict_batches", "2", "--trainer.callbacks+=distill.PredictionWriter"]
    logged = {p.name: file_digest(str(p)) for p in run.iterdir()}
    main([*predict, "--trainer.callbacks.path", str(tmp_path / "p.csv")])
    assert (tmp_path / "p.csv").is_file() and {p.name: file_digest(str(p)) for p in run.iterdir()} == logged

    # Or a log folder of its own, as the refusal advises: evaluated again there, its rows go on; another's do not.
    own = ["--trainer.logger.init_args.save_dir", str(tmp_path / "other_test")]
    for _ in range(2):
        main(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "other" / "checkpoints" / "best.ckpt"),
              *own])  # fmt: skip
    assert len(rows(tmp_path / "other_test" / "metrics.csv")) == 2
    logged = {p.name: file_digest(str(p)) for p in (tmp_path / "other_test").iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["test", "--config", str(config), "--ckpt_path", str(run / "best.ckpt"), *own])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "is not the checkpoint evaluated in " in line and "metrics.csv would take" in line
    assert {p.name: file_digest(str(p)) for p in (tmp_path / "other_test").iterdir()} == logged


def test_a_resumed_fit_keeps_its_teacher_by_its_weights_wherever_its_file_lies(
    tmp_path: Path, small_teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    config = recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1)
    main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2", "--model.channels_last", "false"])
    moved = tmp_path / "elsewhere" / "teacher.ckpt"
    moved.parent.mkdir()
    moved.write_bytes(small_teacher_checkpoint.read_bytes())
    monkeypatch.chdir(moved.parent)  # the same teacher, moved, and spelt relative to another folder
    resume = ["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "run" / "last.ckpt")]
    resume += ["--trainer.limit_train_batches", "2", "--model.teacher.init_args.checkpoint", "teacher.ckpt"]
    machine = ["--data.init_args.eval_batch_size", "16", "--model.channels_last", "true"]  # these may change
    machine += ["--data.init_args.resize", "28"]  # Fashion-MNIST's own size: the same batches
    main([*resume, "--trainer.max_epochs", "2", *machine])
    resumed = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["hyper_parameters"]["channels_last"] is True  # not the checkpoint's

    retrained = torch.load(moved, weights_only=True)  # a teacher retrained in place: the same path, other weights
    first = next(iter(retrained["state_dict"]))
    retrained["state_dict"][first] = retrained["state_dict"][first] + 1.0
    torch.save(retrained, moved)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*resume, "--trainer.max_epochs", "3"])
    assert stop.value.code == 2 and "was distilled from another teacher" in capsys.readouterr().err


def test_a_run_folder_copied_with_its_checkpoints_resumes_knowing_its_best(tmp_path: Path, small_teacher_checkpoint):
    main(["fit", "--config", str(recipe(tmp_path, small_teacher_checkpoint, "a", epochs=1)),
          "--trainer.limit_train_batches", "2"])  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, b)
    last = torch.load(b / "last.ckpt", weights_only=True)
    key = next(k for k, state in last["callbacks"].items() if k.startswith("ModelCheckpoint") and state["monitor"])
    last["callbacks"][key]["best_model_score"] = torch.tensor(1.0)  # a best so far that no later epoch beats
    torch.save(last, b / "last.ckpt")
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    best = (b / "best.ckpt").read_bytes()
    main(["fit", "--config", str(recipe(tmp_path, small_teacher_checkpoint, "b", epochs=2)), "--ckpt_path",
          str(b / "last.ckpt"), "--trainer.limit_train_batches", "2"])  # fmt: skip
    state = torch.load(b / "last.ckpt", weights_only=True)["callbacks"][key]
    assert state["best_model_path"] == str((b / "best.ckpt").resolve()) and float(state["best_model_score"]) == 1.0
    assert (b / "best.ckpt").read_bytes() == best  # Lightning forgot the score: its next epoch took best.ckpt
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before


def test_a_run_with_an_average_of_its_weights_resumes_only_with_it(
    tmp_path: Path, small_teacher_checkpoint: Path, capsys: pytest.CaptureFixture
):
    cfg = yaml.safe_load(recipe(tmp_path, small_teacher_checkpoint, "run", epochs=1).read_text())
    cfg["trainer"]["callbacks"].append(EMA)
    with_ema, without = tmp_path / "ema.yaml", tmp_path / "no_ema.yaml"
    with_ema.write_text(yaml.safe_dump(cfg))
    cfg["trainer"]["callbacks"].remove(EMA)
    without.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(with_ema), "--trainer.limit_train_batches", "2"])
    last = tmp_path / "run" / "last.ckpt"
    before = last.read_bytes()
    resume = ["--ckpt_path", "last", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2"]
    with pytest.raises(SystemExit) as stop:  # Lightning warned, then trained on from the average
        main(["fit", "--config", str(without), *resume])
    assert stop.value.code == 2 and "Resume with that callback" in capsys.readouterr().err
    assert last.read_bytes() == before
    main(["fit", "--config", str(with_ema), *resume])
    assert torch.load(last, weights_only=True)["epoch"] == 1
