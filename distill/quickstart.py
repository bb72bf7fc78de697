"""``distill quickstart``: the whole job on Fashion-MNIST, sized for a 2-core CPU.

1. Train a teacher (``configs/fmnist/teacher.yaml``).
2. Distill StudentNet from its checkpoint (``configs/fmnist/kd.yaml``).
3. Prune and distill that student to a latency target where it runs (``distill prune-distill``; default:
   0.75 of its own milliseconds per batch of 64 in ONNX Runtime on this CPU), beside the two StudentNets of
   other ``width_mult`` whose latencies bracket the pruned student's, each distilled from scratch for the
   same total epochs.
4. Ship the pruned student as float32 and int8 ONNX (:mod:`distill.quantize`), measure every model's ONNX
   file and latency side by side in ONNX Runtime (CPU, batch 64), print one table of them all and write
   ``summary.md`` and ``pareto.png``.

The recipes run through the same CLI as ``distill fit``, resized: a ResNet-18 teacher with timm's
standard stem (cheap on 28x28 images) for 2 epochs, StudentNet for 2, pruning in one round of 1
epoch plus 1 final epoch (so each of the two width_mult StudentNets trains 4 epochs), no augmentation
(so the teacher's logits are computed once and cached). The round replays the recipe's learning-rate
schedule (rewinding, ``benchmarks/prune_recovery.py``); the latency search chooses which of all eight
layers lose channels.
The exact configs that ran are written into the run directory beside the checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distill.export import export_onnx
from distill.latency import LatencyMeter, compare_latency
from distill.prune_distill import (
    check_latency_options,
    check_options,
    check_reachable,
    has_timed_start,
    prune_distill,
)
from distill.pruning import CHANNEL_MULTIPLE, PruningPolicy
from distill.quantize import require_onnxruntime
from distill.recipes import (
    check_recipe,
    check_sections,
    fit_recipe,
    load_recipe,
    relocate,
    teacher_cache,
    with_callbacks,
)
from distill.report import against_baselines, quickstart_table
from distill.rundir import (
    RunState,
    atomic_write,
    changed_settings,
    check_run_dir,
    file_digest,
    hold_run_dir,
    refuse_changes,
    release_run_dir,
)
from students import load_student

__all__ = ["quickstart"]

#: Options added after runs were recorded without them: a run holds them only where they differ from these values,
#: so a run started before they existed resumes (the values those runs ran with, not today's defaults).
_ADDED_OPTIONS = {"latency_rounds": 15}


def quickstart(
    run_dir: str = "runs/quickstart",
    teacher_config: str = "configs/fmnist/teacher.yaml",
    kd_config: str = "configs/fmnist/kd.yaml",
    teacher_model: str = "resnet18",
    teacher_small_input: bool = False,
    teacher_epochs: int = 2,
    student_epochs: int = 2,
    target_latency: float | None = None,
    target_latency_ms: float | None = None,
    prune_rounds: int = 1,
    epochs_per_round: int = 1,
    final_epochs: int = 1,
    importance: str = "l1",
    lr_rewinding: bool = True,
    ignored_layers: Sequence[str] = (),
    batch_size: int = 256,
    augment: bool = False,
    limit_train_batches: int | float = 1.0,
    limit_eval_batches: int | float = 1.0,
    accelerator: str = "auto",
    data_root: str | None = None,
    latency_runtime: str = "onnxruntime",
    latency_batch_size: int = 64,
    latency_rounds: int = LatencyMeter.rounds,
) -> dict[str, dict[str, Any]]:
    """Train a teacher, distill StudentNet from it, prune-distill it to a latency target, print a table.

    Run it again with the same settings to resume: finished stages are reused (``result.json`` of each run,
    ``state.json`` of prune-distill). Other settings in the same ``run_dir`` are refused before any training.

    Args:
        run_dir: output folder: ``teacher.yaml`` and ``student.yaml`` (the configs that ran), ``teacher/``
            and ``student/`` (checkpoints, metrics.csv, config.yaml), ``prune_distill/`` (rounds, the best
            student as .ckpt, .onnx and .int8.onnx, rounds.csv, pareto.png), ``deployed.json`` (the ONNX
            files' sizes and latencies), ``summary.md``, ``quickstart.json`` (the settings, to refuse a rerun with
            others) and ``cache/`` (the teacher's logits, computed once).
        teacher_config: the teacher recipe to start from.
        kd_config: the distillation recipe to start from.
        teacher_model: timm name of the teacher.
        teacher_small_input: give the (ResNet) teacher the small-image stem of the full recipe
            (more accurate, about 30x slower on a CPU).
        teacher_epochs: epochs of teacher training.
        student_epochs: epochs of distillation.
        target_latency: the latency target as a fraction of the distilled StudentNet's own (prune-distill's
            ``target_latency``: every candidate of the search timed beside the student, and kept for a rerun).
            Default: 0.75, unless ``target_latency_ms`` is given.
        target_latency_ms: or the target in milliseconds per batch of ``latency_batch_size`` (the search compares
            milliseconds as they are timed); give one of the two.
        prune_rounds: rounds of the (geometric) pruning schedule.
        epochs_per_round: distillation epochs after each pruning step.
        final_epochs: distillation epochs after the last round.
        importance: pruning criterion (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``).
        lr_rewinding: train each round with the recipe's own schedule instead of fine-tuning at lr / 10.
        ignored_layers: student layers never pruned (default: none). Those StudentNet's ``width_mult`` leaves
            alone (``students.UNSCALED_LAYERS``): ``--ignored_layers '[cnn.0.0, cnn.1.3, cnn.2.3, cnn.7.3]'``.
        batch_size: batch size of every run.
        augment: random crop and flip (the full recipes use them; short runs do better without).
        limit_train_batches: fraction (a float) or number (an int: 1 is one batch) of training batches per
            epoch, for smoke runs.
        limit_eval_batches: fraction or number of validation and test batches.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        data_root: folder with the Fashion-MNIST files (default: the usual search, see FashionMNISTDataModule).
        latency_runtime: where the latency target is measured (``onnxruntime``, ``onnxruntime-int8``, ``torch-cpu``,
            ``torch-cuda``). The table always times the ONNX files in ONNX Runtime on the CPU.
        latency_batch_size: images per forward of those measurements.
        latency_rounds: interleaved rounds of each timing of the latency target (prune-distill's
            ``latency_rounds``): fewer time faster (RESULTS.md, "Timing rounds of a search").

    Returns:
        ``{"teacher", "student", "pruned", "pruned, int8", "width w", ...}``: model, params, val_acc, test_acc,
        checkpoint (or ONNX file), and the size (``onnx_kib``) and ONNX Runtime latency (``latency_ms``) of its
        ONNX file.
    """
    if target_latency is not None and target_latency_ms is not None:
        raise ValueError(f"give one latency target: target_latency={target_latency} (a fraction of the student's) "
                         f"or target_latency_ms={target_latency_ms}, not both")  # fmt: skip
    if target_latency is None and target_latency_ms is None:
        target_latency = 0.75
    settings = json.loads(json.dumps(dict(locals()), default=list))
    settings = {k: v for k, v in settings.items() if _ADDED_OPTIONS.get(k, ...) != v}  # runs from before resume
    out = Path(run_dir)
    check_run_dir(out, "quickstart")
    if target_latency is not None and not 0 < target_latency < 1:
        raise ValueError(f"target_latency is a fraction of the student's latency: need 0 < target_latency < 1, got "
                         f"{target_latency}")  # fmt: skip
    check_options(None, None, importance, "geometric", rounds=prune_rounds, epochs_per_round=epochs_per_round,
                  final_epochs=final_epochs, target_latency_ms=target_latency_ms or 1.0)  # fmt: skip
    if teacher_epochs < 1 or student_epochs < 1:
        raise ValueError(f"need teacher_epochs >= 1 and student_epochs >= 1, got {teacher_epochs} and {student_epochs}")
    if not (limit_train_batches > 0 and limit_eval_batches > 0):  # every stage trains, validates and tests
        raise ValueError(f"need limit_train_batches > 0 and limit_eval_batches > 0, got {limit_train_batches} and "
                         f"{limit_eval_batches}")  # fmt: skip
    common = {
        "batch_size": batch_size,
        "augment": augment,
        "limit_train_batches": limit_train_batches,
        "limit_eval_batches": limit_eval_batches,
        "accelerator": accelerator,
        "data_root": data_root,
    }
    teacher_cfg = load_recipe(teacher_config)
    check_sections(teacher_cfg, teacher_config)
    if "create_timm_model" not in str(teacher_cfg["model"].get("student", {}).get("class_path", "")):
        raise ValueError(
            f"{teacher_config} must train a timm teacher (model.student: students.create_timm_model), as "
            f"configs/fmnist/teacher.yaml does: teacher_model and teacher_small_input are set in it"
        )
    teacher_cfg = _resize(teacher_cfg, out / "teacher", epochs=teacher_epochs, **common)
    teacher_cfg["model"]["student"].setdefault("init_args", {}).update(
        name=teacher_model, small_input=teacher_small_input
    )
    student_cfg = _resize(load_recipe(kd_config), out / "student", epochs=student_epochs, **common)
    student_cfg["model"].pop("teacher", None)  # the teacher trained below
    # before anything trains: the teacher, the student, the data, the target
    check_recipe(teacher_cfg, f"teacher_config {teacher_config}")
    model, data = check_recipe(student_cfg, f"kd_config {kd_config}")
    check_latency_options(latency_runtime, latency_batch_size, True, rounds=latency_rounds)  # True: the table's ONNX
    policy = PruningPolicy(importance, min_fraction=0.1, round_to=CHANNEL_MULTIPLE, ignored_layers=ignored_layers)
    x = torch.zeros(1, data.in_chans, *data.input_size)
    meter = LatencyMeter(tuple(x.shape[1:]), latency_runtime, latency_batch_size, rounds=latency_rounds)
    legacy = json.loads((out / "latency.json").read_text()) if (out / "latency.json").is_file() else {}
    if target_latency_ms is None and legacy.get("setup", {}).get("fraction") == target_latency:
        target_latency_ms = legacy["target_ms"]  # fixed there by an earlier quickstart: its run resumes on it
    fraction = None if target_latency_ms is not None else target_latency  # prune-distill's target_latency
    check_reachable(model.student, x, policy, None, None, target_latency_ms=target_latency_ms, latency=meter,
                    timed_before=has_timed_start(out / "prune_distill"), target_latency=fraction)  # fmt: skip

    # The run in this folder: its settings, with the recipes' contents standing for their paths.
    del settings["run_dir"]
    settings |= {"teacher_config": file_digest(teacher_config), "kd_config": file_digest(kd_config)}
    settings["data_root"] = str(Path(data_root).resolve()) if data_root else None
    record = out / "quickstart.json"
    recorded = json.loads(record.read_text()) if record.is_file() else settings
    if recorded.get("target_latency_ms") is not None:  # recorded before the two targets excluded each other
        recorded["target_latency"] = None
    changed = changed_settings(recorded, settings)
    refuse_changes(out, "quickstart", changed, "finished stages are then reused")
    hold_run_dir(out, "quickstart")  # until the end: another quickstart in this folder is refused
    teacher = fit_recipe(teacher_cfg, out / "teacher.yaml", root=out)
    atomic_write(record, lambda f: json.dump(settings, f, indent=1))  # this folder holds these settings' run

    teacher_spec = {"class_path": "teachers.load_teacher", "init_args": {"checkpoint": teacher.checkpoint}}
    student_cfg["model"]["teacher"] = teacher_spec
    if not augment:  # deterministic inputs: the teacher's logits are computed once, for every run after this
        with_callbacks(student_cfg, teacher_cache(out / "cache"))
    student = fit_recipe(student_cfg, out / "student.yaml", root=out)

    rows = prune_distill(
        recipe=str(out / "student.yaml"),
        student_checkpoint=student.checkpoint,
        target_latency_ms=target_latency_ms,
        target_latency=fraction,
        importance=importance,
        lr_rewinding=lr_rewinding,
        ignored_layers=list(ignored_layers),
        schedule="geometric",
        rounds=prune_rounds,
        epochs_per_round=epochs_per_round,
        final_epochs=final_epochs,
        run_dir=str(out / "prune_distill"),
        cache_teacher_logits=False,  # student.yaml already caches the teacher's logits when it can
        latency_runtime=latency_runtime,
        latency_batch_size=latency_batch_size,
        latency_rounds=latency_rounds,
    )
    state = RunState(out / "prune_distill", "prune-distill").state
    pruned = next(r for r in rows if r["checkpoint"] == state["best"])

    results = {
        "teacher": asdict(teacher),
        "student": asdict(student),
        "pruned": {**pruned, "model_name": f"studentnet, pruned ({pruned['phase']})"},
    }
    deployed = state.get("int8")  # None: not quantizable
    if deployed is not None:
        results["pruned, int8"] = {
            "model_name": "studentnet, pruned, int8 ONNX",
            "params": pruned["params"],
            "val_acc": deployed["int8_val_acc"],  # in ONNX Runtime
            "test_acc": deployed["int8_test_acc"],
            "checkpoint": str((out / "prune_distill" / "best_student.int8.onnx").resolve()),
        }
    for r in rows:
        if r["phase"] == "baseline":
            results[r["student"].split(",")[0].replace("StudentNet width_mult=", "width ")] = {
                **r,
                "model_name": r["student"],
            }
    shipped = {"pruned": out / "prune_distill" / "best_student.onnx"}  # the file a user ships, not another export
    _measure_deployed(results, data.in_chans, data.input_size, latency_batch_size, out / "deployed.json", shipped)
    table = quickstart_table(results, latency_batch_size)
    widths = [r for role, r in results.items() if role.startswith("width ")]
    verdict = against_baselines(results["pruned"], widths) if widths else ""
    goal = f"{state['target_latency_ms']:.3f} ms"
    if fraction is not None:  # the search timed it beside the student: so is it read here
        goal = (f"{fraction:g} of the student's time, {fraction * results['student']['latency_ms']:.3f} ms in this "
                f"table ({goal} when the target was checked)")  # fmt: skip
    summary = (
        "# distill quickstart\n\n"
        f"{table}\n\n{verdict}\n\n"
        "Fashion-MNIST test set (10,000 images, never used for choosing checkpoints); val = 5,000 images held "
        "out of the training set. The int8 row is measured in ONNX Runtime, the others in PyTorch. Latency: "
        f"median milliseconds per batch of {latency_batch_size} of each model's ONNX file in ONNX Runtime on this "
        f"machine's CPU ({torch.get_num_threads()} threads), all measured side by side. "
        f"Latency target: {goal} ({latency_runtime}, batch {latency_batch_size}). "
        f"Rounds and the accuracy-vs-latency plot: {out / 'prune_distill'}/"
        "summary.md and pareto.png.\n\nReproduce (the recipes as they ran, with this folder's paths): `distill fit "
        f"--config {out / 'teacher.yaml'}`, `distill fit --config {out / 'student.yaml'}`, then "
        f"`distill prune-distill --config {out / 'prune_distill' / 'prune_distill.yaml'}`.\n"
    )
    (out / "summary.md").write_text(summary)
    print("\n" + table + f"\n\n{verdict}\n\nWritten: {out / 'summary.md'}, {out / 'prune_distill' / 'pareto.png'}")
    release_run_dir(out)
    return results


def _measure_deployed(
    results: dict[str, dict[str, Any]],
    in_chans: int,
    size: Sequence[int],
    batch: int,
    record: Path,
    onnx_files: dict[str, Path],
) -> None:
    """Add each model's ONNX file size and its latency in ONNX Runtime, all measured side by side: the file of
    ``onnx_files`` where it names the role and the file exists, else the checkpoint exported.

    The figures are kept in ``record`` with the digests of the files measured (the ONNX file, or the checkpoint
    exported): a rerun on the same files reports the same figures.
    """
    sources = {role: Path(r["checkpoint"]) for role, r in results.items()}
    sources |= {role: path for role, path in onnx_files.items() if role in results and path.is_file()}
    digests = {role: file_digest(path) for role, path in sources.items()}
    digests["measured on"] = (
        f"batch {batch}, {torch.get_num_threads()} threads, onnxruntime {require_onnxruntime().__version__}"
    )
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if saved.get("files") != digests:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for role, source in sources.items():
                files[role] = source
                if source.suffix != ".onnx":
                    files[role] = Path(tmp) / f"{len(files)}.onnx"
                    export_onnx(load_student(source), torch.zeros(1, in_chans, *size), files[role])
            latency = compare_latency(files, [in_chans, *size], "onnxruntime", batch_size=batch)
            measured = {role: {"onnx_kib": files[role].stat().st_size / 1024, "latency_ms": latency[role]}
                        for role in results}  # fmt: skip
        saved = {"files": digests, "measured": measured}
        atomic_write(record, lambda f: json.dump(saved, f, indent=1))
    for role, r in results.items():
        r.update(saved["measured"][role])


def _resize(
    cfg: dict[str, Any],
    out: Path,
    epochs: int,
    batch_size: int,
    augment: bool,
    limit_train_batches: int | float,
    limit_eval_batches: int | float,
    accelerator: str,
    data_root: str | None,
) -> dict[str, Any]:
    """A copy of a recipe with this run's size and output folder."""
    cfg = relocate(cfg, out)
    cfg["trainer"].update(
        max_epochs=epochs,
        accelerator=accelerator,
        limit_train_batches=limit_train_batches,
        limit_val_batches=limit_eval_batches,
        limit_test_batches=limit_eval_batches,
    )
    cfg["model"]["warmup_epochs"] = min(cfg["model"].get("warmup_epochs", 0), epochs / 4)
    data = cfg["data"]["init_args"]
    data.update(batch_size=batch_size, augment=augment)
    if data_root is not None:
        data["root"] = data_root
    return cfg
