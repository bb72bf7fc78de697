"""distill prune-distill and distill export on tiny data."""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from helpers import fmnist, start_distill, tiny_kd_recipe

from distill.export import export
from distill.prune_distill import check_baselines, prune_distill
from distill.recipes import check_recipe, fit_recipe, recipe_identity, relocate, teacher_cache, with_callbacks
from distill.report import against_baselines
from distill.rundir import RunState, check_run_dir, hold_run_dir, release_run_dir
from students import UNSCALED_LAYERS, load_student
from students.checkpoint import recorded_data

ROOT = Path(__file__).parents[1]
TARGET = 3_000  # test_studentnet (base 2) has 5,774 parameters


def tiny_recipe(tmp_path: Path, teacher: Path) -> Path:
    return tiny_kd_recipe(tmp_path, teacher)


def options(tmp_path: Path, teacher: Path, **kwargs) -> dict:
    base = {
        "recipe": str(tiny_recipe(tmp_path, teacher)),
        "target_params": TARGET,
        "initial_epochs": 1,
        "epochs_per_round": 1,
        "rounds": 2,
        "final_epochs": 1,
        "run_dir": str(tmp_path / "run"),
        "latency_runtime": "torch-cpu",  # no ONNX export per phase; the first test measures on the default
        "latency_rounds": 5,  # of 15: the tests check what a run does with its timings, not their spread
    }
    return {**base, **kwargs}


def test_loop_stops_at_the_target_with_results_baseline_and_onnx(tmp_path: Path, small_teacher_checkpoint: Path):
    teacher_bytes = hashlib.sha256(small_teacher_checkpoint.read_bytes()).hexdigest()
    rows = prune_distill(**options(tmp_path, small_teacher_checkpoint, latency_runtime="onnxruntime", round_to=4))
    run = tmp_path / "run"

    phases = [(r["phase"], r["round"]) for r in rows]
    assert phases == [("initial", 0), ("baseline", 0), ("round", 1), ("round", 2), ("final", 3)]
    last_round = [r for r in rows if r["phase"] == "round"][-1]
    assert last_round["params"] <= TARGET < rows[0]["params"]
    thin = next(r for r in rows if r["phase"] == "baseline")
    assert thin["params"] <= last_round["params"] and thin["epochs"] == 1 + 2 + 1  # same total epochs
    widths = load_student(thin["checkpoint"]).channels[3:7]  # those width_mult scales: in multiples of round_to,
    assert (
        [w % 4 for w in widths] == [0] * 4
        and thin["student"] == f"StudentNet width_mult={widths[0] / 16:g}, KD from scratch"
    )  # fmt: skip  (as the pruned student's are: odd counts would run slower in ONNX Runtime)

    with open(run / "rounds.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["phase"] for t in table] == ["initial", "round", "round", "final", "baseline"]
    assert {"round", "params", "macs", "latency_ms", "val_acc", "test_acc"} <= set(table[0])
    assert float(table[1]["latency_ms"]) > 0 and int(table[2]["macs"]) < int(table[0]["macs"])
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = (run / "summary.md").read_text()
    assert "Best student under 3,000 parameters" in summary and "| StudentNet width_mult=" in summary
    assert "): prune-distill is" in summary or "No baseline runs as fast" in summary  # the verdict on latency
    assert f"`distill prune-distill --config {run.resolve() / 'prune_distill.yaml'}`" in summary  # runs anywhere

    student = load_student(run / "best_student.ckpt")  # reloads without any callback or config
    assert sum(p.numel() for p in student.parameters()) <= TARGET
    session = ort.InferenceSession(str(run / "best_student.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, student(x).detach().numpy(), atol=1e-4, rtol=0)
    said = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert said["input_size"] == [1, 28, 28] and said["label_names"][0] == "T-shirt/top"  # how to feed and read it
    assert recorded_data(torch.load(run / "best_student.ckpt", weights_only=True))[1]["inputs"]["mean"] == [0.286]
    int8 = json.loads((run / "state.json").read_text())["int8"]  # quantized, measured in ONNX Runtime
    assert int8["int8_bytes"] == (run / "best_student.int8.onnx").stat().st_size < int8["float_bytes"]
    assert int8["float_latency_ms"] > 0 and int8["int8_latency_ms"] > 0
    best = next(r for r in rows if r["checkpoint"] == RunState(run, "prune-distill").state["best"])
    assert abs(int8["float_val_acc"] - best["val_acc"]) <= 1 / 64  # the same 2 batches of 32 as in PyTorch
    assert "| best_student.int8.onnx |" in summary and "best_student.int8.onnx (" in summary

    assert hashlib.sha256(small_teacher_checkpoint.read_bytes()).hexdigest() == teacher_bytes  # teacher untouched
    state = json.loads((run / "state.json").read_text())
    assert state["best_metadata"] == session.get_modelmeta().custom_metadata_map

    for name in ("best_student.onnx", "best_student.int8.onnx"):  # as a run before the files said how to use them
        older = onnx.load(run / name)
        del older.metadata_props[:]
        onnx.save(older, run / name)
    (run / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "best_metadata"}))
    again = prune_distill(**options(tmp_path, small_teacher_checkpoint, latency_runtime="onnxruntime", round_to=4))
    assert again == rows and json.loads((run / "state.json").read_text())["phases"] == state["phases"]
    for name in ("best_student.onnx", "best_student.int8.onnx"):  # written again, saying it
        meta = ort.InferenceSession(str(run / name), providers=["CPUExecutionProvider"]).get_modelmeta()
        assert state["best_metadata"].items() <= meta.custom_metadata_map.items(), name  # int8: and quantization's


@pytest.mark.slow
def test_a_killed_run_resumes_at_its_last_round_with_the_same_result(tmp_path: Path, small_teacher_checkpoint: Path):
    settings = options(tmp_path, small_teacher_checkpoint, rounds=3, final_epochs=0, baseline=False, export_onnx=False)
    reference = prune_distill(**{**settings, "run_dir": str(tmp_path / "reference")})

    config = tmp_path / "pd.yaml"
    config.write_text(yaml.safe_dump(settings))
    worker = start_distill("prune-distill", "--config", str(config))
    state_file = tmp_path / "run" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline:  # kill it as soon as round 1 is recorded
        if state_file.exists() and "round1" in json.loads(state_file.read_text())["phases"]:
            break
        time.sleep(0.1)
    before = state_file.read_bytes()
    with pytest.raises(ValueError, match=rf"is in use by another prune-distill process \(pid {worker.pid}\)"):
        prune_distill(**settings)  # two at once trained into the same files: one crashed, one lost metrics rows
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    done = json.loads(state_file.read_text())["phases"]
    assert "round1" in done and "round3" not in done and "round1" in json.loads(before)["phases"]

    resumed = prune_distill(**settings)
    assert [r["params"] for r in resumed] == [r["params"] for r in reference]
    a = load_student(tmp_path / "run" / "best_student.ckpt").state_dict()
    b = load_student(tmp_path / "reference" / "best_student.ckpt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_from_a_trained_student_scores_its_start_as_it_scores_the_rounds(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    settings = options(tmp_path, small_teacher_checkpoint, student_checkpoint=str(small_teacher_checkpoint),
                       rounds=1, final_epochs=0, baseline=False, export_onnx=False)  # fmt: skip
    rows = prune_distill(**settings)
    start = rows[0]
    assert start["phase"] == "start" and 0 < start["test_acc"] <= 1 and 0 < start["val_acc"] <= 1
    student, data = load_student(start["checkpoint"]), fmnist()  # the recipe's data: batches of 32, 500 to validate
    data.setup("test")
    hits = [(student(b.x).argmax(1) == b.y).float() for b in itertools.islice(data.test_dataloader(), 2)]
    assert start["test_acc"] == pytest.approx(torch.cat(hits).mean().item(), abs=1e-6)  # limit_test_batches: 2
    with open(tmp_path / "run" / "rounds.csv") as f:
        assert next(csv.DictReader(f))["test_acc"] == f"{start['test_acc']}"  # in the table, not "nan"


def test_a_recipe_is_the_same_wherever_it_writes_and_its_files_lie_but_not_with_other_data(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    cfg = with_callbacks(yaml.safe_load(tiny_kd_recipe(tmp_path, small_teacher_checkpoint).read_text()),
                         teacher_cache(tmp_path / "cache"))  # fmt: skip
    moved = tmp_path / "moved" / "teacher.ckpt"
    moved.parent.mkdir()
    shutil.copy(small_teacher_checkpoint, moved)
    elsewhere = with_callbacks(relocate(yaml.safe_load(tiny_kd_recipe(tmp_path, moved).read_text()), tmp_path / "b"),
                               teacher_cache(tmp_path / "moved" / "cache"))  # fmt: skip
    assert recipe_identity(cfg) == recipe_identity(elsewhere)
    for other in ({"root": str(tmp_path / "data")}, {"batch_size": 16}):
        changed = copy.deepcopy(cfg)
        changed["data"]["init_args"].update(other)
        assert recipe_identity(changed) != recipe_identity(cfg), other
    retrained = torch.load(moved, weights_only=True)
    first = next(iter(retrained["state_dict"]))
    retrained["state_dict"][first] += 1
    torch.save(retrained, moved)
    assert recipe_identity(cfg) != recipe_identity(elsewhere)


def test_a_folder_a_killed_job_left_with_its_lock_only_resumes_that_job_only(tmp_path: Path):
    folder = tmp_path / "qs"  # a quickstart killed while its teacher trained: teacher/ and the lock file, no record
    (folder / "teacher").mkdir(parents=True)
    (folder / "teacher" / "config.yaml").write_text("trainer: {}\n")
    hold_run_dir(folder, "quickstart")
    release_run_dir(folder)  # the file stays, as a killed process leaves it
    check_run_dir(folder, "quickstart")  # its own folder: it resumes
    with pytest.raises(ValueError, match=r"holds fit runs that no prune-distill made \(teacher/\)"):
        check_run_dir(folder, "prune-distill")  # it would have trained beside the teacher, and the quickstart's rerun
    (folder / ".distill.lock").write_text("4242\n")  # been refused; a lock written before it named its job: any one's
    check_run_dir(folder, "prune-distill")
    (folder / ".distill.lock").write_text("not a lock of ours\n")  # nobody's
    with pytest.raises(ValueError, match="holds fit runs that no quickstart made"):
        check_run_dir(folder, "quickstart")
    (folder / ".distill.lock").unlink()
    (folder / ".distill.lock").mkdir()
    with pytest.raises(ValueError, match=r"its \.distill\.lock is not a file \(jobs lock it\): remove it"):
        check_run_dir(folder, "quickstart")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_params": 10**7}, ValueError, "is not below the student's 5,774"),
        ({"target_params": 300, "min_fraction": 0.5}, ValueError, "cannot be met without emptying a layer"),
        ({"schedule": "linear"}, ValueError, "Unknown schedule 'linear'; choose one of fixed, geometric"),
        ({"importance": "weights"}, ValueError, "Unknown importance criterion 'weights'"),
        (
            {"target_macs": 1000},
            ValueError,
            "exactly one of target_params, target_macs, target_latency_ms or target_latency",
        ),
        ({"target_latency_ms": -1.0, "target_params": None}, ValueError, "target_latency_ms must be a positive"),
        ({"baselines": ["resnet10t"]}, ValueError, "is a timm model name: it needs a timm student recipe"),
        ({"student_checkpoint": "nowhere.ckpt"}, FileNotFoundError, "Student checkpoint 'nowhere.ckpt' does not exist"),
        ({"ignored_layers": ["cnn.9"]}, ValueError, r"ignored_layers names no layer of the student: \['cnn.9'\]"),
    ],
)
def test_bad_input(tmp_path: Path, small_teacher_checkpoint: Path, kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        prune_distill(**options(tmp_path, small_teacher_checkpoint, baseline=False, export_onnx=False, **kwargs))


def test_timm_baselines_are_checked_by_name_before_anything_trains():
    recipe = {"model": {"student": {"class_path": "students.create_timm_model", "init_args": {"name": "test_resnet"}}}}
    check_baselines(recipe, ["test_resnet", "timm/test_convnext"])  # timm models: taken
    with pytest.raises(ValueError, match="'resnet9000' is not a timm model"):  # was found after every phase trained
        check_baselines(recipe, ["test_resnet", "resnet9000"])


def test_a_trial_logs_into_its_own_folder_with_one_logger_or_a_list(tmp_path: Path):
    """relocate moved a single logger only: a sweep of a recipe with a list of loggers rewrote the recipe's run."""
    csv_logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs/kd"}}
    checkpoint = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": "runs/kd"}}
    for logger in (
        csv_logger,
        [csv_logger, {**csv_logger, "class_path": "pytorch_lightning.loggers.TensorBoardLogger"}],
    ):
        recipe = {"trainer": {"logger": logger, "callbacks": [checkpoint]}}
        moved = relocate(recipe, tmp_path / "trial")["trainer"]
        loggers = moved["logger"] if isinstance(moved["logger"], list) else [moved["logger"]]
        assert [entry["init_args"]["save_dir"] for entry in loggers] == [str(tmp_path / "trial")] * len(loggers)
        assert moved["callbacks"][0]["init_args"]["dirpath"] == str(tmp_path / "trial")
        assert moved["default_root_dir"] == str(tmp_path / "trial") and recipe["trainer"]["callbacks"] == [checkpoint]
    assert csv_logger["init_args"]["save_dir"] == "runs/kd"  # the recipe itself is left as it was


def test_missing_teacher_and_changed_settings(tmp_path: Path, small_teacher_checkpoint: Path):
    with pytest.raises(FileNotFoundError, match=r"Teacher checkpoint .* does not exist"):
        prune_distill(**options(tmp_path, tmp_path / "no_teacher.ckpt"))
    settings = options(tmp_path, small_teacher_checkpoint, rounds=1, final_epochs=0, baseline=False, export_onnx=False)
    del settings["latency_rounds"]  # the default, as below
    prune_distill(**settings)
    with pytest.raises(ValueError, match=r"other settings \(epochs_per_round changed\)"):
        prune_distill(**{**settings, "epochs_per_round": 2})
    with pytest.raises(ValueError, match=r"other settings \(ignore_unprunable changed\)"):
        prune_distill(**{**settings, "ignore_unprunable": True})
    state_file = tmp_path / "run" / "state.json"  # a run started before an option existed still resumes
    state = json.loads(state_file.read_text())
    assert not {"ignore_unprunable", "latency_rounds"} & set(state["settings"])  # added later: held only where they
    # are not the default
    del state["settings"]["ignored_layers"]
    state_file.write_text(json.dumps(state))
    assert prune_distill(**settings)[-1]["phase"] == "round"


def test_a_run_holds_its_settings_once_it_trained_and_compares_contents_not_path_spellings(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    settings = options(tmp_path, small_teacher_checkpoint, rounds=1, final_epochs=0, baseline=False, export_onnx=False)
    run = tmp_path / "run"
    rows = prune_distill(**settings)
    spelled = {"run_dir": os.path.relpath(run), "recipe": str(Path(os.path.relpath(settings["recipe"])))}
    assert prune_distill(**{**settings, **spelled}) == rows  # the same run, its paths written another way
    same = {"overrides": {"data": {"init_args": {"batch_size": 32}}}}  # the recipe's own: the same recipe
    assert prune_distill(**{**settings, **same}) == rows  # (data moved to a node's scratch: given as an override)
    with pytest.raises(
        ValueError, match=r"other inputs \(the content of the recipe \(its settings, overrides included"
    ):
        prune_distill(**{**settings, "overrides": {"data": {"init_args": {"batch_size": 16}}}})
    moved = tmp_path / "moved"  # a run directory moved (or copied) elsewhere resumes on its own files
    shutil.move(run, moved)
    rerooted = [{**r, "checkpoint": r["checkpoint"].replace(str(run.resolve()), str(moved.resolve()))} for r in rows]
    assert prune_distill(**{**settings, "run_dir": str(moved)}) == rerooted
    shutil.move(moved, run)

    state = json.loads((run / "state.json").read_text())
    state["phases"] = {}  # as a run killed (or refused late) before its first phase ended leaves it
    (run / "state.json").write_text(json.dumps(state))
    corrected = prune_distill(**{**settings, "epochs_per_round": 2})  # nothing trained: the new settings hold
    assert [r["epochs"] for r in corrected if r["phase"] == "round"] == [2]
    with pytest.raises(ValueError, match=r"other settings \(epochs_per_round changed\)"):
        prune_distill(**settings)  # now it has trained: held to them


def test_ignored_layers_keep_their_channels(tmp_path: Path, small_teacher_checkpoint: Path):
    settings = options(tmp_path, small_teacher_checkpoint, rounds=1, final_epochs=0, baseline=False, export_onnx=False)
    rows = prune_distill(**settings, ignored_layers=list(UNSCALED_LAYERS))
    start = load_student(rows[0]["checkpoint"]).channels
    pruned = load_student(tmp_path / "run" / "best_student.ckpt").channels
    assert rows[-1]["params"] <= TARGET
    assert [pruned[i] for i in (0, 1, 2, 7)] == [start[i] for i in (0, 1, 2, 7)]
    assert all(pruned[i] < start[i] for i in range(3, 7))


def test_a_timm_student_with_unprunable_layers_keeps_them_through_the_rounds(
    tmp_path: Path, small_teacher_checkpoint: Path, capsys: pytest.CaptureFixture
):
    """timm's MambaOut splits its fc1 outputs by sizes fixed when it is built: pruning fc1 breaks it."""
    student = {"class_path": "students.create_timm_model", "init_args": {"name": "test_mambaout"}}
    settings = options(tmp_path, small_teacher_checkpoint, target_params=100_000, final_epochs=0, baseline=False,
                       export_onnx=False, overrides={"model": {"student": student}})  # fmt: skip
    with pytest.raises(ValueError, match=r"pruning \d layers .* breaks the student .*or ignore_unprunable to keep"):
        prune_distill(**settings)
    rows = prune_distill(**settings, ignore_unprunable=True)
    kept = json.loads((tmp_path / "run" / "state.json").read_text())["kept_layers"]
    assert kept and all(name.endswith(".fc1") for name in kept)
    assert [r["phase"] for r in rows] == ["initial", "round", "round"] and rows[-1]["params"] <= 100_000
    found = [line for line in capsys.readouterr().out.splitlines() if "kept whole" in line]
    assert len(found) == 1 and found[0].startswith("round 1: ")  # round 2 starts from what round 1 found
    start, pruned = load_student(rows[0]["checkpoint"]), load_student(tmp_path / "run" / "best_student.ckpt")
    assert all(pruned.get_submodule(n).out_features == start.get_submodule(n).out_features for n in kept)
    assert rows[-1]["params"] < rows[0]["params"]


def test_a_job_is_not_refused_for_lightnings_version_counter_in_its_recipe(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    """A user's recipe without enable_version_counter: false, whose own rerun is refused (best.ckpt would be the run
    before's): a job checking it beside that trained folder, or rerunning a phase killed after it saved best.ckpt and
    before it recorded its result, reads the best checkpoint's path, and is not refused."""
    cfg = relocate(yaml.safe_load(tiny_recipe(tmp_path, small_teacher_checkpoint).read_text()), tmp_path / "run")
    for callback in cfg["trainer"]["callbacks"]:
        callback.get("init_args", {}).pop("enable_version_counter", None)
    first = fit_recipe(cfg, tmp_path / "run.yaml")
    check_recipe(cfg)  # as prune-distill and sweep check their recipe before they start
    (tmp_path / "run" / "result.json").unlink()
    again = fit_recipe(cfg, tmp_path / "run.yaml")
    assert again.checkpoint == str(tmp_path / "run" / "best-v1.ckpt") and first.checkpoint.endswith("best.ckpt")


def test_a_finished_run_is_reused_only_while_its_recipe_inputs_and_checkpoint_are_the_same(
    tmp_path: Path, small_teacher_checkpoint: Path
):
    cfg = relocate(yaml.safe_load(tiny_recipe(tmp_path, small_teacher_checkpoint).read_text()), tmp_path / "run")
    first = fit_recipe(cfg, tmp_path / "run.yaml")
    best = Path(first.checkpoint)
    stamp = best.stat().st_mtime_ns
    assert fit_recipe(cfg, tmp_path / "run.yaml") == first and best.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError, match="need finite lr > 0"):
        fit_recipe({**cfg, "model": {**cfg["model"], "lr": -1.0}}, tmp_path / "run.yaml")
    assert fit_recipe(cfg, tmp_path / "run.yaml") == first  # the refused run took nothing away
    torch.save(torch.load(best, weights_only=True) | {"epoch": 7}, best)  # the checkpoint replaced since
    again = fit_recipe(cfg, tmp_path / "run.yaml")
    assert best.stat().st_mtime_ns != stamp and again.val_acc == first.val_acc  # trained again, to the same


def test_export_command_checks_onnx_and_torchscript(tmp_path: Path, small_teacher_checkpoint: Path):
    diffs = export(str(small_teacher_checkpoint), onnx=str(tmp_path / "t.onnx"), torchscript=str(tmp_path / "t.pt"))
    assert set(diffs) == {"onnx", "torchscript"} and max(diffs.values()) < 1e-4
    with pytest.raises(ValueError, match="Nothing to export"):
        export(str(small_teacher_checkpoint))


def test_an_export_at_another_size_than_the_students_says_so(
    tmp_path: Path, small_teacher_checkpoint: Path, capsys: pytest.CaptureFixture
):
    export(str(small_teacher_checkpoint), onnx=str(tmp_path / "t.onnx"))
    assert "warning" not in capsys.readouterr().err
    export(str(small_teacher_checkpoint), onnx=str(tmp_path / "t32.onnx"), input_size=32)  # a choice: allowed
    assert capsys.readouterr().err.startswith(f"warning: {small_teacher_checkpoint} was trained on 28x28 images; the "
                                              f"files take 32x32 (their metadata says so)")  # fmt: skip
    said = ort.InferenceSession(str(tmp_path / "t32.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(said.custom_metadata_map["input_size"]) == [1, 32, 32]


def test_the_verdict_says_which_baseline_is_over_the_size_target():
    """A user's baseline over the target was compared on speed with no word of its size (the journey's 99,967
    parameters against a 70,000 target read as "the pruned student is 2.21x faster")."""
    best = {"student": "round 2", "params": 60_000, "macs": 1, "latency_ms": 1.0, "test_acc": 0.9}
    wide = {"student": "wide", "params": 99_967, "macs": 1, "latency_ms": 2.2, "test_acc": 0.95}
    thin = {"student": "thin", "params": 50_000, "macs": 1, "latency_ms": 0.9, "test_acc": 0.85}
    said = against_baselines(best, [wide, thin], {"value": 70_000, "unit": "parameters"})
    assert "thin (50,000 parameters, 0.900 ms, test 0.8500): prune-distill is +5.00 points (wins)" in said
    assert "wide (99,967 parameters, over the 70,000 parameters target, test 0.9500), runs in 2.200 ms" in said
    assert "over the" not in against_baselines(best, [wide, thin], {"value": 1.5, "unit": "ms"})


def test_a_run_of_other_input_files_names_the_ones_that_changed(tmp_path: Path):
    """Only the teacher was retrained, and the refusal named every file the run reads (the student's too)."""
    run = RunState(tmp_path / "run", "prune-distill")
    files = {"teacher.ckpt": "digest-1", "student.ckpt": "digest-2"}
    try:
        run.hold({"rounds": 1}, {"inputs": files}, ())
        run.record("round1", {"phase": "round"})
        retrained = {**files, "teacher.ckpt": "digest-3"}
        with pytest.raises(ValueError, match=r"other inputs \(a file it reads \(teacher.ckpt\) changed since it"):
            RunState(tmp_path / "run", "prune-distill").hold({"rounds": 1}, {"inputs": retrained}, ())
    finally:
        release_run_dir(tmp_path / "run")
