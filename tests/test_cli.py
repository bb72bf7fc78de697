"""The distill command: every recipe instantiates, runs end to end, and bad input is one clear line."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fmnist, run_script
from jsonargparse import Namespace

from distill import DistillModule
from distill.cli import JOBS as COMMANDS
from distill.cli import main
from distill.lightning_cli import DistillCLI, _asked_subcommand
from distill.recipes import load_recipe, merge
from students import StudentNet, load_student, save_student, width_for_params
from teachers import FrozenTeacher, TeacherEnsemble

ROOT = Path(__file__).parents[1]
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
JOBS = {  # job configs (distill sweep / prune-distill) name their recipe; the rest are distill fit recipes
    c: "sweep" if "temperatures" in yaml.safe_load(c.read_text()) else "prune-distill"
    for c in ALL_CONFIGS
    if "recipe" in yaml.safe_load(c.read_text())
}
CONFIGS = [c for c in ALL_CONFIGS if c not in JOBS]


def _localise(config: Path, tmp_path: Path, teacher_checkpoint: Path) -> Path:
    """The recipe with its outputs under tmp_path and its teacher checkpoints replaced by a tiny one."""

    def fix(node):
        if isinstance(node, dict):
            return {k: (str(teacher_checkpoint) if k == "checkpoint" else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, str) and node.startswith("runs/"):
            return str(tmp_path / node)
        return node

    out = tmp_path / config.name
    out.write_text(yaml.safe_dump(fix(yaml.safe_load(config.read_text()))))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_config_instantiates(config: Path, tmp_path: Path, teacher_checkpoint: Path):
    cli = DistillCLI(args=["--config", str(_localise(config, tmp_path, teacher_checkpoint))], run=False)
    assert isinstance(cli.model, DistillModule)
    assert cli.model.student.num_classes == cli.datamodule.num_classes == 10  # linked from the data
    assert cli.model.student(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    teacher = yaml.safe_load(config.read_text())["model"].get("teacher")
    if teacher is not None:
        assert isinstance(cli.model.teacher, (FrozenTeacher, TeacherEnsemble))
        assert cli.model.hparams.teacher_checkpoint
    if config.name == "teacher_re.yaml":  # issue 17's teacher levers
        assert cli.datamodule.random_erasing == 0.5
    if config.name == "teacher_ls.yaml":
        assert cli.model.loss.label_smoothing == 0.1


VARIANTS = [(c, v) for c in JOBS for v in (yaml.safe_load(c.read_text()).get("variants") or {})]


@pytest.mark.parametrize(("config", "variant"), VARIANTS, ids=[f"{c.name}:{v}" for c, v in VARIANTS])
def test_every_sweep_variant_instantiates(config: Path, variant: str, tmp_path: Path, teacher_checkpoint: Path):
    job = yaml.safe_load(config.read_text())
    cfg = merge(merge(load_recipe(str(ROOT / job["recipe"])), job.get("overrides")), job["variants"][variant])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cli = DistillCLI(args=["--config", str(_localise(recipe, tmp_path, teacher_checkpoint))], run=False)
    assert isinstance(cli.model, DistillModule)
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "ModelCheckpoint" in callbacks  # a variant extends the recipe's callbacks, never replaces them
    if variant in ("ema", "all"):
        assert "EMA" in callbacks
    if variant in ("mixup", "all"):
        assert cli.model.mixer is not None
    if variant in ("erasing", "all"):
        assert cli.datamodule.random_erasing > 0
    if config.name == "sweep_small.yaml":  # the widest StudentNet within each budget of issue 17's targets
        budget = {"p100k": 100_000, "p50k": 50_000}[variant.split("_")[0]]
        student = cli.model.student
        assert student.num_pools == (2 if variant.endswith("pools2") else 3)
        assert sum(p.numel() for p in student.parameters()) <= budget
        width = job["variants"][variant]["model"]["student"]["init_args"]["width_mult"]
        assert width == width_for_params(budget, num_classes=10, in_chans=1)
    if variant == "ensemble":  # another class_path replaces the recipe's teacher
        assert isinstance(cli.model.teacher, TeacherEnsemble) and len(cli.model.teacher.teachers) == 2


@pytest.mark.parametrize("config", list(JOBS), ids=[str(c.relative_to(ROOT)) for c in JOBS])
def test_every_job_config_parses(config: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # in-process (a fresh interpreter per config cost 5 s each; the help test runs one)
    with pytest.raises(SystemExit) as printed:
        main([JOBS[config], "--config", str(config), "--print_config"])
    assert printed.value.code in (0, None)
    settings = yaml.safe_load(capsys.readouterr().out)
    assert (ROOT / settings["recipe"]).is_file()
    if JOBS[config] == "sweep":
        assert settings["temperatures"] and settings["seeds"]
    else:
        assert (
            sum(
                (settings.get(t) or 0) > 0
                for t in ("target_params", "target_macs", "target_latency_ms", "target_latency")
            )
            == 1
        )


def test_debug_recipe_runs(tmp_path: Path):
    args = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "true"]
    main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), *args])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # in the run's folder, not the working directory
    assert saved["model"]["student"]["init_args"]["base"] == 2
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 5  # limit_train_batches: 5
    assert load_student(checkpoint).channels == [2, 4, 8, 16, 32, 32, 32, 32]  # StudentNet, base 2


def test_predict_writes_each_test_images_class_and_probability(tmp_path: Path):
    """``distill predict --ckpt_path``: the checkpoint's student on the test split, a CSV row per image, in order."""
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *args, "--trainer.enable_checkpointing", "true"])
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main(["predict", *args, "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "2"])
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = fmnist(batch_size=32)
    data.setup("test")
    x, y = next(iter(data.test_dataloader()))[:2]
    student = load_student(checkpoint)
    with torch.no_grad():
        probability, predicted = student(x).softmax(-1).max(-1)
    assert len(rows) == 64 and [int(r["index"]) for r in rows] == list(range(64))
    assert [int(r["label"]) for r in rows[:32]] == y.tolist()
    assert [int(r["predicted"]) for r in rows[:32]] == predicted.tolist()
    assert [float(r["probability"]) for r in rows[:32]] == pytest.approx(probability.tolist(), abs=1e-5)
    names = [(r["label_name"], r["predicted_name"]) for r in rows[:32]]
    assert names == [(data.classes[a], data.classes[b]) for a, b in zip(y.tolist(), predicted.tolist(), strict=True)]
    on_device = (tmp_path / "predictions.csv").read_text()
    main(["predict", *args, "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "2",
          "--data.init_args.on_device", "true"])  # fmt: skip
    assert (tmp_path / "predictions.csv").read_text() == on_device  # batches served on the device: same rows


def test_a_limit_of_one_batch_is_one_batch(tmp_path: Path):
    """Lightning types limit_train_batches ``float | int``: parsed from a config, 1 became 1.0 (every batch)."""
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    cli = DistillCLI(args=["fit", *args, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"])
    assert cli.trainer.global_step == 1 and cli.trainer.num_val_batches == [1]


def test_a_command_builds_the_parser_of_its_own_subcommand_and_parses_alike(tmp_path: Path):
    """Each subcommand's parser cost 0.1 s to build, and every fit and each phase of a job built all four."""
    every = {"fit", "validate", "test", "predict"}
    for args, asked in ((["fit", "--config", "x.yaml"], "fit"), (["--config", "x.yaml", "fit"], None), ([], None),
                        ({"fit": {}}, "fit"), (Namespace(fit=Namespace(), subcommand="fit"), "fit"),
                        ({"fit": {}, "test": {}}, None), ({"fit": {}, "subcommand": "test"}, None)):  # fmt: skip
        assert _asked_subcommand(args, every) == asked, args
    args = ["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]  # fmt: skip
    one = DistillCLI(args=args)
    assert (
        list(one._subcommand_parsers) == ["fit"] and one.trainer.global_step == 1 and len(DistillCLI.subcommands()) == 4
    )
    each = DistillCLI(args=args, parser_kwargs={"fit": {"prog": "distill"}, "test": {"prog": "distill"}})
    assert list(each._subcommand_parsers) == sorted(every, key=list(DistillCLI.subcommands()).index)  # Lightning's
    assert each.config == one.config


def test_help_lists_lightning_commands_and_jobs(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for word in ("fit", "validate", "test", "quickstart", "sweep", "prune-distill", "export"):
        assert word in out


@pytest.mark.parametrize("command", ["fit", "quickstart", "sweep", "prune-distill", "export"])
def test_help_shows_docstrings_without_their_markup(command: str, capsys: pytest.CaptureFixture):
    """The options' help comes from docstrings: ``x`` and :func:`x` show as `x` in a terminal. A student, teacher or
    loss names the project's modules, not all 1,500 torch.nn.Module subclasses imported (4,500 lines of help)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "``" not in out and not re.search(r":[a-z]+:`", out)
    if command == "fit":
        assert len(out.splitlines()) < 1000 and "torch.nn.Identity" not in out and "students.StudentNet," in out
        assert "pytorch_lightning.callbacks.LearningRateMonitor" in out.replace("\n", "").replace(" ", "")
    if command == "prune-distill":  # a role across two lines of the docstring; a private name
        assert "(`distill.latency.relative_to`)" in out.replace("\n", " ") and "_Phases" not in out
    if command != "fit":  # a job's description is its docstring's first line: a sentence cut there read "give at"
        first_line = COMMANDS[command][0].__doc__.splitlines()[0].replace("``", "`")
        assert first_line.endswith(".") and out.split("\n\n")[1].replace("\n", " ") == first_line


def test_bad_input_is_one_clear_line_from_the_console_script(tmp_path: Path):
    """A sweep whose teacher cannot load: one line, not optuna's tracebacks (its log handler holds the process's
    stderr, which tests/test_faults.py, running commands in-process, does not see), and no run folder."""
    config = tmp_path / "kd.yaml"
    (tmp_path / "teacher.ckpt").write_text("not a checkpoint\n")
    config.write_text(
        (ROOT / "configs" / "fmnist" / "kd.yaml")
        .read_text()
        .replace("runs/fmnist/teacher/best.ckpt", str(tmp_path / "teacher.ckpt"))
    )
    sweep = [sys.executable, "-m", "distill.cli", "sweep", "--recipe", str(config), "--run_dir", str(tmp_path / "s")]
    result = subprocess.run(sweep, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Seed set to")]
    assert result.returncode == 2 and len(lines) == 1 and "is not a readable torch file" in lines[0], result.stderr
    assert not (tmp_path / "s").exists()


def test_pretrained_weights_out_of_reach_are_one_line_naming_the_ways_to_give_them(tmp_path: Path):
    """``pretrained: true`` where the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE, an empty cache): the
    console script ends with one line saying which weights and how to give them, before anything is written."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    fit = [sys.executable, "-m", "distill.cli", "fit", "--config", str(ROOT / "configs/fmnist/teacher.yaml"),
           "--model.student.init_args.name", "test_resnet", "--model.student.init_args.pretrained", "true"]  # fmt: skip
    result = subprocess.run(fit, capture_output=True, text=True, cwd=work, env=env)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Seed set to")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("distill: error: timm's pretrained weights of test_resnet could not be read (Cannot ")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "pretrained_cfg_overlay: {file: PATH}" in lines[0]
    assert not any(work.iterdir())  # the recipe writes runs/fmnist/teacher here


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A tiny ``distill quickstart``: its folder, settings and results (the slow tests below share it)."""
    from distill.quickstart import quickstart

    run_dir = tmp_path_factory.mktemp("quickstart") / "qs"
    settings = dict(
        run_dir=str(run_dir),
        teacher_config=str(ROOT / "configs/fmnist/teacher.yaml"),
        kd_config=str(ROOT / "configs/fmnist/kd.yaml"),
        teacher_model="test_resnet",
        teacher_epochs=1,
        student_epochs=1,
        target_latency=0.6,  # of the quietest of three timings (one alone read 33% high once), well below the student
        prune_rounds=1,
        ignored_layers=("cnn.0.0", "cnn.1.3", "cnn.2.3", "cnn.3.3", "cnn.7.3"),  # 4 models a timing, not 9 (the
        # search over all eight layers on ONNX Runtime: test_latency_search_benchmark_prints_each_search_and_...)
        final_epochs=0,
        limit_train_batches=3,
        limit_eval_batches=2,
        accelerator="cpu",
        latency_rounds=5,  # of 15: the tests check what the run does with its timings, not their spread
    )
    return run_dir, settings, quickstart(**settings)


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart_run: tuple[Path, dict, dict]):
    from distill.quickstart import quickstart

    qs, settings, results = quickstart_run
    widths = [role for role in results if role.startswith("width ")]  # those bracketing the pruned student's ms
    assert set(results) == {"teacher", "student", "pruned", "pruned, int8", *widths} and 1 <= len(widths) <= 2
    int8 = results["pruned, int8"]
    assert int8["checkpoint"] == str((qs / "prune_distill" / "best_student.int8.onnx").resolve())
    assert int8["onnx_kib"] < results["pruned"]["onnx_kib"] and int8["params"] == results["pruned"]["params"]
    assert all(r["latency_ms"] > 0 for r in results.values())
    assert Path(results["teacher"]["checkpoint"]).is_file() and Path(results["student"]["checkpoint"]).is_file()
    student_ckpt = torch.load(results["student"]["checkpoint"], weights_only=True)
    assert student_ckpt["hyper_parameters"]["teacher_checkpoint"] == results["teacher"]["checkpoint"]
    assert results["pruned"]["params"] < results["student"]["params"]
    shipped = qs / "prune_distill" / "best_student.onnx"  # the table's pruned row: the file a user ships
    assert results["pruned"]["onnx_kib"] == shipped.stat().st_size / 1024
    kept = load_student(qs / "prune_distill" / "best_student.ckpt").channels
    assert [kept[i] for i in (0, 1, 2, 3, 7)] == [16, 32, 64, 128, 256]  # the layers it was told to leave alone
    pruning = json.loads((qs / "prune_distill" / "state.json").read_text())  # 0.6 of the student's ms as checked
    assert pruning["target_latency_ms"] == round(0.6 * pruning["start_latency_ms"], 3)
    assert pruning["settings"]["latency_rounds"] == 5  # the quickstart's, passed on to prune-distill's timings
    assert pruning["pruned"]["1"]["searched_ms"] <= pruning["target_latency_ms"]  # met as the search measured it
    bracket = pruning["bracket"]  # the widths timed just faster and just slower than the pruned student
    assert sorted(bracket["widths"]) == sorted(float(w.removeprefix("width ")) for w in widths)
    faster = [w for w in bracket["widths"] if bracket["ms"][f"{w:g}"] <= bracket["ms"]["pruned"]]
    assert len(faster) <= 1 and len(bracket["widths"]) - len(faster) <= 1
    for w in widths:  # each trained from scratch for the student's epochs and the rounds' (1 + 1)
        assert results[w]["model_name"] == f"StudentNet {w.replace(' ', '_mult=')}, KD from scratch"
        assert results[w]["epochs"] == 2
    summary = (qs / "summary.md").read_text()
    assert "Latency target: 0.6 of the student's time, " in summary  # as timed in its table, beside the pruned
    for row in ("| teacher | test_resnet |", "| student | studentnet |", "| pruned |", "| pruned, int8 |",
                *(f"| {w} |" for w in widths)):  # fmt: skip
        assert row in summary
    for name in ("pareto.png", "rounds.csv", "best_student.onnx", "best_student.int8.onnx", "best_student.ckpt"):
        assert (qs / "prune_distill" / name).is_file()
    assert (qs / "student.yaml").is_file() and (qs / "student" / "config.yaml").is_file()

    # Run again: every stage is reused, nothing trains; with other settings it is refused and nothing changes.
    trained = {p: p.stat().st_mtime_ns for p in qs.rglob("*.ckpt")}
    assert quickstart(**{**settings, "run_dir": settings["run_dir"] + "/"}) == results  # the same folder
    assert {p: p.stat().st_mtime_ns for p in qs.rglob("*.ckpt")} == trained
    before = {p: p.read_bytes() for p in qs.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings \(student_epochs changed\)"):
        quickstart(**{**settings, "student_epochs": 2})
    assert {p: p.read_bytes() for p in qs.rglob("*") if p.is_file()} == before

    # Moved elsewhere, the run is the same run: nothing trains, and its results name its files where they are now.
    elsewhere = shutil.copytree(qs, qs.parent / "moved")
    hidden = qs.rename(qs.parent / "hidden")  # a path left to the old folder fails
    try:
        trained = {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*.ckpt")}
        moved = quickstart(**{**settings, "run_dir": str(elsewhere)})
        assert {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*.ckpt")} == trained
        assert json.loads(json.dumps(results).replace(str(qs.resolve()), str(elsewhere.resolve()))) == moved
    finally:
        hidden.rename(qs)  # for the test below


@pytest.mark.slow
def test_prune_recovery_benchmark_runs_on_a_quickstart(quickstart_run: tuple[Path, dict, dict], tmp_path: Path):
    """benchmarks/prune_recovery.py on a quickstart's output: a smoke run (its numbers are in RESULTS.md)."""
    qs = quickstart_run[0]
    args = ["--quickstart", str(qs), "--start-epochs", "2", "--extra-epochs", "2"]
    args += ["--target-params", "150000", "--variants", "rounds_finetune", "oneshot_rewind_seed_layers"]
    args += ["--out", str(tmp_path / "recovery")]
    run_script("benchmarks/prune_recovery.py", *args)
    table = (tmp_path / "recovery" / "table.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in table[4:] if line.startswith("| ")]  # after the header
    thin = "thin StudentNet, KD from scratch"
    assert rows[:2] == ["rounds_finetune", "oneshot_rewind_seed_layers"]
    assert rows[2] in (f"{thin}, 3 epochs", f"{thin}, 4 epochs")  # the start's best epoch, plus 2
    assert rows[3] == f"{thin}, 2 epochs (the variants' extra epochs only)"
    assert (qs / "student_2_epochs" / "best.ckpt").is_file()  # the longer start, shared by seeds, in the quickstart
    twice = ["--seed-table", *[str(tmp_path / "recovery")] * 2]
    seeds = run_script("benchmarks/prune_recovery.py", *twice).stdout.splitlines()
    first = [c.strip() for c in seeds[2].strip("|").split("|")]
    one = [c.strip() for c in table[4].strip("|").split("|")]  # the same variant's row in the one-run table
    assert seeds[0].startswith("| 2 seeds |") and first[0] == "rounds_finetune"
    assert first[3] == f"{one[3]} / {one[3]}" and first[4] == f"{one[3]} ± 0.0000" and first[6] == one[4]
    settings = yaml.safe_load((tmp_path / "recovery" / "rounds_finetune" / "prune_distill.yaml").read_text())
    assert settings["lr_rewinding"] is False and settings["rounds"] == 2  # the variant is what its name says
    kept = load_student(tmp_path / "recovery" / "oneshot_rewind_seed_layers" / "best_student.ckpt").channels
    assert [kept[i] for i in (0, 1, 2, 7)] == [16, 32, 64, 256] and kept[3] < 128  # the thin net's layout


def test_the_quickstart_table_measures_the_shipped_file_and_measures_it_again_once_it_changed(tmp_path: Path):
    """The pruned row is best_student.onnx as shipped; its figures are kept by the digest of that file, so a file
    written again under the same checkpoint (or a record from before the row read it) is measured again."""
    import onnx

    from distill.export import export_onnx
    from distill.quickstart import _measure_deployed

    model = StudentNet(base=2, num_classes=10, in_chans=1, num_pools=3)
    checkpoint = save_student(model, tmp_path / "best_student.ckpt", [1, 28, 28])
    shipped = tmp_path / "best_student.onnx"
    export_onnx(model, torch.zeros(1, 1, 28, 28), shipped)

    def measured() -> dict:
        results = {"pruned": {"checkpoint": str(checkpoint)}}
        _measure_deployed(results, 1, (28, 28), 8, tmp_path / "deployed.json", {"pruned": shipped})
        return results["pruned"]

    first = measured()
    assert first["onnx_kib"] == shipped.stat().st_size / 1024 and first["latency_ms"] > 0
    assert measured() == first  # kept: the same file
    graph = onnx.load(str(shipped))
    onnx.helper.set_model_props(graph, {"label_names": json.dumps([str(c) for c in range(10)])})
    onnx.save(graph, str(shipped))  # the shipped file written again, its checkpoint the same
    assert measured()["onnx_kib"] == shipped.stat().st_size / 1024 > first["onnx_kib"]


@pytest.mark.parametrize(
    ("loss", "setting", "terms"),
    [
        ("distill.DKDLoss", ("--model.loss.nckd_weight", "4"), {"dkd", "tckd", "nckd", "ce"}),
        ("distill.LogitStandardKDLoss", ("--model.loss.kd_weight", "4"), {"kd", "ce"}),
        ("distill.DISTLoss", ("--model.loss.intra_weight", "4"), {"dist", "inter", "intra", "ce"}),
    ],
)
def test_each_kd_loss_is_chosen_on_the_command_line_and_trains(
    loss: str, setting: tuple[str, str], terms: set[str], tmp_path: Path, teacher_checkpoint: Path
):
    config = _localise(ROOT / "configs" / "fmnist" / "kd.yaml", tmp_path, teacher_checkpoint)
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "32"]  # fmt: skip
    cli = DistillCLI(args=["--config", str(config), "--model.loss", loss, *setting, *tiny], run=False)
    assert type(cli.model.loss).__name__ == loss.split(".")[1] and getattr(cli.model.loss, setting[0][13:]) == 4.0
    # kd.yaml's KDLoss settings that the new class has carry over (jsonargparse): only the temperature, no weight
    defaults = type(cli.model.loss)().spec["init_args"] | {"temperature": 4.0, setting[0][13:]: 4.0}
    assert cli.model.loss.spec["init_args"] == defaults
    teacher = {k: v.clone() for k, v in cli.model.teacher.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = {k.split("/")[1] for k in cli.trainer.callback_metrics if k.startswith("train/")}
    assert terms | {"loss", "acc"} <= logged and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert all(torch.equal(v, teacher[k]) for k, v in cli.model.teacher.state_dict().items())
    assert getattr(cli.model.loss, "epoch", 0) == 0  # DKD's ramp was told the epoch
