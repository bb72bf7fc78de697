"""``distill prune-distill``: the most accurate student under a size target.

The classic schedule is train, prune, fine-tune at a low learning rate, iterated with a growing
ratio (Han et al. 2015; seeds 001 and 002). Here every fine-tuning phase is a distillation phase from
the frozen teacher, as in seed 004's homework. Rounds repeat until the target (parameters or MACs)
is met:

1. prune the student by the round's step of the schedule, under one :class:`~distill.pruning.PruningPolicy`;
2. distill it for ``epochs_per_round`` epochs, at a fine-tune learning rate or with the recipe's schedule
   again (learning-rate rewinding, Renda et al. 2020); 3. measure it: size, latency on the runtime the
   student is deployed on (default: ONNX Runtime on the CPU, batch 64), accuracies.

An optional network-slimming phase (Liu et al. 2017) comes first and a longer distillation last. The
honest baseline is trained beside it: a StudentNet whose ``width_mult`` gives the same parameter
count, distilled from scratch for the same total epochs. The best student is shipped as a checkpoint,
float32 ONNX and int8 ONNX (:mod:`distill.quantize`), each measured where it runs. Every phase is its
own ``distill fit`` run with its exact config in the run directory, recorded when it ends
(:mod:`distill.rundir`): a killed run resumes after its last finished phase and, phases being seeded,
ends with the same student.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.export import export_onnx as to_onnx
from distill.latency import check_runtime, compare_latency, measure_latency
from distill.module import DistillModule
from distill.profile import count_macs, count_params
from distill.pruning import (
    CRITERIA,
    ROUND_SCHEDULES,
    PruningPolicy,
    channel_counts,
    check_target,
    labelled_batches,
    prune_student,
    round_schedule,
)
from distill.quantize import quantize_checked, require_onnxruntime
from distill.recipes import (
    build_datamodule,
    check_recipe,
    file_digest,
    fit_recipe,
    input_digests,
    job_recipe,
    relocate,
    teacher_cache,
    with_callbacks,
)
from distill.report import prune_distill_report
from distill.rundir import RunState
from students import load_student, read_checkpoint, save_student, width_for_params

__all__ = ["check_latency_options", "check_options", "check_reachable", "prune_distill"]


def prune_distill(
    recipe: str = "configs/fmnist/kd.yaml",
    target_params: int | None = None,
    target_macs: int | None = None,
    student_checkpoint: str | None = None,
    initial_epochs: int | None = None,
    slimming_epochs: int = 0,
    slimming_lambda: float = 1e-4,
    importance: str = "l1",
    schedule: str = "geometric",
    ratio: float = 0.05,
    rounds: int = 5,
    max_rounds: int = 50,
    global_ranking: bool = False,
    ignored_layers: list[str] | None = None,
    min_fraction: float = 0.1,
    round_to: int = 1,
    epochs_per_round: int = 3,
    lr_rewinding: bool = True,
    finetune_lr: float | None = None,
    final_epochs: int = 10,
    baseline: bool = True,
    export_onnx: bool = True,
    int8: bool = True,
    latency_runtime: str = "onnxruntime",
    latency_batch_size: int = 64,
    overrides: dict[str, Any] | None = None,
    run_dir: str = "runs/prune_distill",
    seed: int = 0,
    cache_teacher_logits: bool = True,
) -> list[dict[str, Any]]:
    """Prune and distill the student round by round down to a size target.

    Args:
        recipe: the KD recipe (teacher, student, data, loss, optimizer) every phase runs.
        target_params: stop once the student has at most this many parameters.
        target_macs: or once one forward of one image costs at most this many MACs.
        student_checkpoint: a trained student to start from (``distill fit`` checkpoint); without it the
            recipe's student is distilled first for ``initial_epochs``.
        initial_epochs: epochs of that first distillation (default: the recipe's ``max_epochs``).
        slimming_epochs: epochs of KD with an L1 penalty on BatchNorm scales before pruning (0: none).
        slimming_lambda: strength of that penalty.
        importance: pruning criterion (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``).
        schedule: ``fixed`` removes ``ratio`` of the channels per round (seed 004: 0.05, width x0.95);
            ``geometric`` reaches the target in ``rounds`` rounds of equal relative size.
        ratio: channels removed per round by the fixed schedule (the last round stops at the target).
        rounds: rounds of the geometric schedule.
        max_rounds: give up (with an error) after so many rounds.
        global_ranking: rank channels across layers instead of the same ratio in every layer.
        ignored_layers: student layers whose output channels are never pruned (e.g.
            ``students.UNSCALED_LAYERS``, the StudentNet layers its ``width_mult`` leaves alone).
        min_fraction: every layer keeps at least this fraction of its channels before pruning started.
        round_to: kept channel counts are rounded up to a multiple of this.
        epochs_per_round: distillation epochs after each pruning step.
        lr_rewinding: train each round with the recipe's own learning-rate schedule (warmup, peak, decay)
            compressed into the round, instead of fine-tuning at ``finetune_lr`` (better in every
            comparison of ``benchmarks/prune_recovery.py``).
        finetune_lr: learning rate of the fine-tuning rounds (default: the recipe's ``lr`` / 10), cosine.
        final_epochs: a longer distillation of the last student (0: none), with the recipe's schedule.
        baseline: also distill a thin StudentNet of the same parameter count from scratch, for the same
            total epochs (StudentNet recipes only).
        export_onnx: export the best student under the target to ONNX and check it in ONNX Runtime.
        int8: with ``export_onnx``, also quantize it to int8 (``best_student.int8.onnx``, calibrated on the
            training split; ``distill export --int8`` has the calibration options) and measure both files'
            accuracy and latency in ONNX Runtime.
        latency_runtime: where each phase's latency is measured: ``onnxruntime`` (CPU), ``onnxruntime-int8``,
            ``torch-cpu`` (eager) or ``torch-cuda``.
        latency_batch_size: images per forward of that measurement.
        overrides: values merged into the recipe for every phase (e.g. ``{"data": {"init_args": {...}}}``).
        run_dir: folder for the phases, ``rounds.csv``, ``pareto.png``, ``summary.md`` and the best student.
        seed: base seed; phase k runs with ``seed + k``.
        cache_teacher_logits: compute the teacher's logits once per deterministic split for all phases.

    Returns:
        The rows of ``rounds.csv``.
    """
    settings = dict(locals())  # the arguments: a run directory resumes only with the same ones
    check_options(target_params, target_macs, importance, schedule, ratio, rounds, max_rounds, epochs_per_round,
                  final_epochs, initial_epochs, slimming_epochs, slimming_lambda, finetune_lr, min_fraction, round_to,
                  seed)  # fmt: skip
    check_latency_options(latency_runtime, latency_batch_size, export_onnx)
    # Every check runs before the run directory is touched: a refused run writes nothing and locks nothing.
    base = job_recipe(recipe, overrides)
    if student_checkpoint is not None and not Path(student_checkpoint).is_file():
        raise FileNotFoundError(f"Student checkpoint {student_checkpoint!r} does not exist. Fix the path, or omit it.")
    model, data = check_recipe(base)
    if student_checkpoint is not None:
        start = load_student(student_checkpoint)
        DistillModule(start).check_data(data)  # its classes and input channels fit the data
    else:
        start = model.student
    del model  # the teacher it holds is loaded again by each phase
    x = torch.zeros(1, data.in_chans, *data.input_size)
    policy = PruningPolicy(importance, global_ranking, min_fraction=min_fraction, round_to=round_to,
                           ignored_layers=ignored_layers or ())  # fmt: skip
    floors = check_reachable(start, x, policy, target_params, target_macs, schedule, ratio, max_rounds)
    by_params = target_params is not None
    target = target_params if by_params else target_macs
    unit = "parameters" if by_params else "MACs"

    def size(student: torch.nn.Module) -> int:
        return count_params(student) if by_params else count_macs(student, x)

    out = Path(run_dir).resolve()
    run = RunState(out, "prune-distill")
    inputs = input_digests(base) | ({student_checkpoint: file_digest(student_checkpoint)} if student_checkpoint else {})
    recorded = {"recipe": json.dumps(base, sort_keys=True, default=str), "inputs": inputs}
    run.hold(settings, recorded, compared_as_contents=("run_dir", "recipe", "student_checkpoint"))
    (out / "prune_distill.yaml").write_text(yaml.safe_dump(run.state["settings"], sort_keys=False))
    latency = {"runtime": latency_runtime, "batch_size": latency_batch_size}
    phases = _Phases(run, base, data, seed, out / "cache" if cache_teacher_logits else None, latency)

    # ---------------------------------------------------------------- the starting student
    if student_checkpoint is not None:
        current = phases.import_student(student_checkpoint)
    else:
        current = phases.run("initial", 0, initial_epochs or int(base["trainer"].get("max_epochs") or 1))
    if slimming_epochs > 0:
        slim = {"class_path": "distill.pruning.NetworkSlimming", "init_args": {"lambda_": slimming_lambda}}
        current = phases.run("slimming", 0, slimming_epochs, current, callbacks=[slim])
    start_size = size(load_student(current))  # the trained student, before the first round (also when resuming)

    # -------------------------------------------------------------------------- rounds
    steps = round_schedule(schedule, rounds, ratio, max_rounds, target_params, target_macs)
    done = [r for r in phases.rows if r["phase"] == "round"]  # resuming: continue after the last finished round
    k = done[-1]["round"] if done else 0
    if done:
        current = done[-1]["checkpoint"]
    while size(student := load_student(current)) > target:
        k += 1
        if k > max_rounds:
            raise ValueError(f"the target was not met in max_rounds={max_rounds} rounds; raise it or the ratio")
        step = _toward_target(steps, k, size(student), start_size, target, by_params)
        pruned = phases.prune(student, k, policy, floors, step)
        lr = None if lr_rewinding else (finetune_lr or float(base["model"].get("lr", 2e-3)) / 10)
        current = phases.run("round", k, epochs_per_round, pruned, lr=lr)
    if final_epochs > 0:
        current = phases.run("final", k + 1, final_epochs, current)

    # ------------------------------------------------------------------ best and baseline
    unit_key = "params" if by_params else "macs"
    under = [r for r in phases.rows if r["phase"] in ("round", "final") and r[unit_key] <= target]
    best = max(under, key=lambda r: (r["val_acc"], r["round"]))
    onnx_diff = phases.save_best(best["checkpoint"], export_onnx)
    deployed = phases.save_int8(recipe) if export_onnx and int8 else None
    thin = None
    if baseline:  # the same epochs as everything the pruned student went through (its start included)
        thin = phases.baseline(best["params"], sum(r["epochs"] for r in phases.rows if r["phase"] != "baseline"))
    rows = phases.rows
    prune_distill_report(out, [r for r in rows if r["phase"] != "baseline"], best, thin, target, unit, onnx_diff,
                         deployed, latency)  # fmt: skip
    return rows


def check_options(
    target_params: int | None,
    target_macs: int | None,
    importance: str = "l1",
    schedule: str = "geometric",
    ratio: float = 0.05,
    rounds: int = 5,
    max_rounds: int = 50,
    epochs_per_round: int = 3,
    final_epochs: int = 10,
    initial_epochs: int | None = None,
    slimming_epochs: int = 0,
    slimming_lambda: float = 1e-4,
    finetune_lr: float | None = None,
    min_fraction: float = 0.1,
    round_to: int = 1,
    seed: int = 0,
) -> None:
    """Refuse options of :func:`prune_distill` that are wrong on their own, before any phase starts.

    Each of them reaches a later phase's config; refused there, it would have stopped a run half-way.
    """
    if (target_params is None) == (target_macs is None):
        raise ValueError("give exactly one of target_params or target_macs")
    if schedule not in ROUND_SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(ROUND_SCHEDULES)}")
    if importance not in CRITERIA:
        raise ValueError(f"Unknown importance criterion {importance!r}; choose one of {', '.join(CRITERIA)}")
    rules = {
        "0 < ratio < 1": 0 < ratio < 1,
        "rounds >= 1": rounds >= 1,
        "max_rounds >= 1": max_rounds >= 1,
        "epochs_per_round >= 1": epochs_per_round >= 1,
        "final_epochs >= 0": final_epochs >= 0,
        "initial_epochs >= 1": initial_epochs is None or initial_epochs >= 1,
        "slimming_epochs >= 0": slimming_epochs >= 0,
        "finite slimming_lambda >= 0": 0 <= slimming_lambda < math.inf,
        "finite finetune_lr > 0": finetune_lr is None or 0 < finetune_lr < math.inf,
        "0 <= min_fraction < 1": 0 <= min_fraction < 1,
        "round_to >= 1": round_to >= 1,
        "0 <= seed < 2**31": 0 <= seed < 2**31,  # phases are seeded seed + k (the baseline seed + 1000)
    }
    broken = [rule for rule, holds in rules.items() if not holds]
    if broken:
        given = dict(ratio=ratio, rounds=rounds, max_rounds=max_rounds, epochs_per_round=epochs_per_round,
                     final_epochs=final_epochs, initial_epochs=initial_epochs, slimming_epochs=slimming_epochs,
                     slimming_lambda=slimming_lambda, finetune_lr=finetune_lr, min_fraction=min_fraction,
                     round_to=round_to, seed=seed)  # fmt: skip
        names = [name for name in given if any(name in rule for rule in broken)]
        raise ValueError(f"need {', '.join(broken)}; got {', '.join(f'{n}={given[n]}' for n in names)}")


def check_latency_options(runtime: str, batch_size: int, needs_onnx: bool) -> None:
    """Refuse a latency runtime or batch size that cannot be measured here, before anything trains."""
    check_runtime(runtime, batch_size, "latency_runtime", "latency_batch_size")
    if needs_onnx:
        require_onnxruntime()


def check_reachable(
    student: torch.nn.Module,
    x: torch.Tensor,
    policy: PruningPolicy,
    target_params: int | None,
    target_macs: int | None,
    schedule: str = "geometric",
    ratio: float = 0.05,
    max_rounds: int = 50,
) -> dict[str, int]:
    """Refuse a target that pruning ``student`` under ``policy`` cannot reach; return each group's floor.

    The target must be below the student's size, reachable with every layer at its floor (of the channels
    before pruning starts), and, for the fixed schedule, within ``max_rounds`` rounds.
    """
    by_params = target_params is not None
    target = target_params if by_params else target_macs
    unit = "parameters" if by_params else "MACs"
    start_size = count_params(student) if by_params else count_macs(student, x)
    if start_size <= target:
        raise ValueError(f"target {target:,} {unit} is not below the student's {start_size:,}: nothing to prune")
    floors = policy.floors(channel_counts(student, x, policy.ignored_layers))
    check_target(student, x, policy, target_params=target_params, target_macs=target_macs, floors=floors)
    if schedule == "fixed":  # channels shrink both sides of a conv: at best the size falls by (1 - ratio)^2
        needed = math.ceil(math.log(target / start_size) / (2 * math.log(1 - ratio)))
        if needed > max_rounds:
            raise ValueError(
                f"the fixed schedule needs at least {needed} rounds of ratio={ratio} to reach {target:,} {unit} from "
                f"{start_size:,}, more than max_rounds={max_rounds}: raise ratio or max_rounds, or use geometric"
            )
    return floors


def _toward_target(steps: Any, k: int, now: int, start: int, target: int, by_params: bool) -> dict[str, Any]:
    """What round ``k`` prunes: the schedule's step, or the target itself once the step would pass it."""
    key = "target_params" if by_params else "target_macs"
    if k > steps.steps:
        return {key: target}
    step = steps.step(k, start, start)  # the schedule measures in the target's unit
    if step.ratio is not None:  # fixed: channels shrink both sides of a conv, so the size about squares
        return {key: target} if now * (1 - step.ratio) ** 2 <= target else {"ratio": step.ratio}
    goal = step.target_params if by_params else step.target_macs
    return {key: goal} if goal < now else {key: target}


class _Phases:
    """The phases of one run: each a ``distill fit`` of the recipe, recorded in the run's ``state.json``."""

    def __init__(
        self, run: RunState, base: dict[str, Any], data: Any, seed: int, cache: Path | None, latency: dict[str, Any]
    ) -> None:
        self.run_state = run
        self.latency = latency
        self.out = run.folder
        self.base = base
        self.data = data
        self.seed = seed
        self.cache = cache
        self.x = torch.zeros(1, data.in_chans, *data.input_size)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.run_state.phases.values(), key=lambda r: (r["round"], r["phase"] == "final"))

    def _record(self, key: str, round_: int, phase: str, epochs: int, checkpoint: str, **accuracies: float) -> str:
        """Measure the phase's student and record it: size, latency, accuracies, checkpoint."""
        model = load_student(checkpoint)
        row = {"round": round_, "phase": phase, "epochs": epochs, "params": count_params(model),
               "macs": count_macs(model, self.x),
               "latency_ms": round(measure_latency(model, self.x.shape[1:], **self.latency), 3),
               **accuracies, "checkpoint": checkpoint}  # fmt: skip
        self.run_state.record(key, row)
        return checkpoint

    def import_student(self, path: str) -> str:
        """Copy a trained student into the run as phase 0 (so that resuming needs nothing outside it)."""
        if "start" not in self.run_state.phases:
            copy_path = save_student(load_student(path), self.out / "start.ckpt", input_shape=list(self.x.shape[1:]))
            epochs = int(read_checkpoint(path).get("epoch", -1)) + 1  # Lightning records the 0-based epoch
            self._record("start", 0, "start", epochs, str(copy_path), val_acc=math.nan, test_acc=math.nan)
        return self.run_state.phases["start"]["checkpoint"]

    def prune(self, student: torch.nn.Module, k: int, policy: PruningPolicy, floors: dict, step: dict) -> str:
        """Prune ``student`` by round ``k``'s step; the pruned student's checkpoint."""
        torch.manual_seed(self.seed + k)
        batches = labelled_batches(self.data.train_dataloader(), policy.num_batches)  # for data-driven criteria
        prune_student(student, self.x, policy, floors=floors, data=batches, **step)
        return str(save_student(student, self.out / f"round{k}_pruned.ckpt"))  # not in round{k}/, the phase's folder

    def run(
        self,
        phase: str,
        round_: int,
        epochs: int,
        student: str | None = None,
        lr: float | None = None,
        callbacks: list[dict] | None = None,
        student_config: dict | None = None,
    ) -> str:
        """Run one ``distill fit`` phase (or find it recorded); its best checkpoint."""
        key = phase if phase in ("initial", "slimming", "final", "baseline") else f"round{round_}"
        if key in self.run_state.phases:
            return self.run_state.phases[key]["checkpoint"]
        folder = self.out / key
        cfg = relocate(self.base, folder)
        cfg["seed_everything"] = self.seed + round_ + (1000 if phase == "baseline" else 0)
        cfg["trainer"]["max_epochs"] = epochs
        if student is not None:
            start = {"path": student, "train": True}
            cfg["model"]["student"] = {"class_path": "students.load_student", "init_args": start}
        if student_config is not None:
            cfg["model"]["student"] = student_config
        if lr is not None:  # fine-tuning: a lower peak, no warmup, cosine over the phase
            cfg["model"].update(lr=lr, warmup_epochs=0)
        else:
            cfg["model"]["warmup_epochs"] = min(float(cfg["model"].get("warmup_epochs", 0)), epochs / 4)
        with_callbacks(cfg, *(callbacks or []), *([teacher_cache(self.cache)] if self.cache is not None else []))
        result = fit_recipe(cfg)
        return self._record(key, round_, phase, epochs, result.checkpoint, val_acc=result.val_acc,
                            test_acc=result.test_acc)  # fmt: skip

    def save_best(self, checkpoint: str, export_onnx: bool) -> float | None:
        """Save the best student as ``best_student.ckpt`` (and ``.onnx``, then ONNX Runtime's largest difference
        from PyTorch is returned), once: a rerun finds it recorded."""
        state = self.run_state.state
        path, onnx = self.out / "best_student.ckpt", self.out / "best_student.onnx"
        if not (state.get("best") == checkpoint and path.is_file() and (onnx.is_file() or not export_onnx)):
            model = load_student(checkpoint)
            save_student(model, path, input_shape=list(self.x.shape[1:]))
            if export_onnx:
                state["onnx_max_abs_diff"] = to_onnx(model, self.x, onnx)
            state["best"] = checkpoint
            self.run_state.save()
        return state.get("onnx_max_abs_diff") if export_onnx else None

    def save_int8(self, recipe: str) -> dict[str, Any] | None:
        """Quantize ``best_student.onnx`` to ``best_student.int8.onnx`` and measure both files in ONNX Runtime
        (accuracy on validation and test, size, latency side by side), once: a rerun finds it recorded.

        A student ONNX Runtime cannot quantize is reported (``None``), not raised: the run keeps its students.
        """
        state = self.run_state.state
        int8 = self.out / "best_student.int8.onnx"
        recorded = state.get("int8")
        if recorded is None or recorded.get("best") != state["best"] or not int8.is_file():
            data = build_datamodule(self.base, recipe)  # the recipe's data, without augmentation
            trainer = self.base["trainer"]  # the batches the phases' accuracies were measured on
            limits = {split: trainer.get(f"limit_{split}_batches") for split in ("val", "test")}
            try:
                result = quantize_checked(self.out / "best_student.onnx", int8, data, None, ("val", "test"), limits)
            except ValueError as err:
                print(f"warning: no best_student.int8.onnx: {err}", file=sys.stderr)
                return None
            files = {"float32": self.out / "best_student.onnx", "int8": int8}
            shape, options = self.x.shape[1:], {**self.latency, "runtime": "onnxruntime"}
            ms = compare_latency(files, shape, **options)
            state["int8"] = {**result, "float_latency_ms": ms["float32"], "int8_latency_ms": ms["int8"],
                             "best": state["best"]}  # fmt: skip
            self.run_state.save()
        return state["int8"]

    def baseline(self, params: int, epochs: int) -> dict[str, Any] | None:
        """A StudentNet with the largest width_mult whose parameters do not exceed ``params``, KD from scratch."""
        student = self.base["model"]["student"]
        if not str(student.get("class_path", "")).endswith("StudentNet"):
            return None
        init_args = dict(student.get("init_args") or {})
        width = width_for_params(params, **init_args, num_classes=self.data.num_classes, in_chans=self.data.in_chans)
        if width is None:
            return None
        init_args["width_mult"] = width
        config = {"class_path": "students.StudentNet", "init_args": init_args}
        self.run(phase="baseline", round_=0, epochs=epochs, student_config=config)
        return {**self.run_state.phases["baseline"], "width_mult": width}
