"""``distill prune-distill``: the most accurate student under a size or latency target.

The classic schedule is train, prune, fine-tune at a low learning rate, iterated with a growing
ratio (Han et al. 2015; seeds 001 and 002). Here every fine-tuning phase is a distillation phase from
the frozen teacher, as in seed 004's homework. Rounds repeat until the target (parameters, MACs, or
milliseconds measured on the runtime the student ships to) is met:

1. prune the student by the round's step of the schedule, under one :class:`~distill.pruning.PruningPolicy`;
2. distill it for ``epochs_per_round`` epochs, at a fine-tune learning rate or with the recipe's schedule
   again (learning-rate rewinding, Renda et al. 2020); 3. measure it: size, accuracies. At the end every
   student is timed side by side on the runtime it is deployed on (default: ONNX Runtime on the CPU, batch 64).

A latency target is met by a measured search of which layers lose channels (NetAdapt, Yang et al. 2018;
HALP, Shen et al. 2022; :mod:`distill.pruning.search`), with kept channel counts in multiples the runtime
runs fast (``round_to``, default :data:`distill.pruning.CHANNEL_MULTIPLE`).

An optional network-slimming phase (Liu et al. 2017) comes first and a longer distillation last; the layout
found may also be retrained from scratch (Liu et al. 2019, "Rethinking the value of network pruning"). The
honest baselines are trained beside it, each distilled from scratch for the same total epochs: StudentNets
of other ``width_mult`` (or a timm student's smaller variants), and every student is timed side by side at
the end, so that ``summary.md`` says at the target's latency which wins and by how much. The best student is
shipped as a checkpoint, float32 ONNX and int8 ONNX (:mod:`distill.quantize`), each measured where it runs.
Every phase is its own ``distill fit`` run with its exact config in the run directory, recorded when it ends
(:mod:`distill.rundir`): a killed run resumes after its last finished phase and, phases being seeded,
ends with the same student.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning import Trainer

from distill.export import deployment_metadata
from distill.export import export_onnx as to_onnx
from distill.latency import LatencyMeter, check_runtime, compare_latency, relative_to
from distill.lightning_cli import stop_if_terminated
from distill.module import DistillModule
from distill.profile import count_macs, count_params
from distill.pruning import (
    CHANNEL_MULTIPLE,
    CRITERIA,
    ROUND_SCHEDULES,
    PruningPolicy,
    channel_counts,
    check_latency_target,
    check_target,
    labelled_batches,
    prune_student,
    round_schedule,
)
from distill.quantize import quantize_checked, require_onnxruntime
from distill.recipes import (
    build_datamodule,
    check_recipe,
    fit_recipe,
    input_digests,
    job_recipe,
    recipe_identities,
    relocate,
    teacher_cache,
    with_callbacks,
)
from distill.report import phase_label, prune_distill_report
from distill.rundir import RunState, check_run_dir, file_digest, release_run_dir
from students import (
    StudentNet,
    load_student,
    read_checkpoint,
    save_student,
    studentnet_channels,
    thin_channels,
    width_for_params,
)
from students.timm_models import check_timm_name

__all__ = ["check_latency_options", "check_options", "check_reachable", "has_timed_start", "prune_distill"]


#: Options added after runs were recorded without them: a run holds them only where they differ from these values,
#: so a run started before they existed resumes (the values those runs ran with, not today's defaults).
_ADDED_OPTIONS = {"ignore_unprunable": False, "latency_rounds": 15}


def prune_distill(
    recipe: str = "configs/fmnist/kd.yaml",
    target_params: int | None = None,
    target_macs: int | None = None,
    target_latency_ms: float | None = None,
    target_latency: float | None = None,
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
    ignore_unprunable: bool = False,
    min_fraction: float = 0.1,
    round_to: int = CHANNEL_MULTIPLE,
    epochs_per_round: int = 3,
    lr_rewinding: bool = True,
    finetune_lr: float | None = None,
    final_epochs: int = 10,
    retrain_from_scratch: bool = False,
    baseline: bool = True,
    baselines: list[float | str] | None = None,
    export_onnx: bool = True,
    int8: bool = True,
    latency_runtime: str = "onnxruntime",
    latency_batch_size: int = 64,
    latency_threads: int | None = None,
    latency_rounds: int = LatencyMeter.rounds,
    overrides: dict[str, Any] | None = None,
    run_dir: str = "runs/prune_distill",
    seed: int = 0,
    cache_teacher_logits: bool = True,
) -> list[dict[str, Any]]:
    """Prune and distill the student round by round down to a size or latency target.

    Args:
        recipe: the KD recipe (teacher, student, data, loss, optimizer) every phase runs.
        target_params: stop once the student has at most this many parameters.
        target_macs: or once one forward of one image costs at most this many MACs.
        target_latency_ms: or once a batch runs in at most this many milliseconds on ``latency_runtime``
            (``latency_batch_size`` images, ``latency_threads``), as measured there: which layers lose channels
            is then chosen by importance per millisecond saved (:mod:`distill.pruning.search`).
        target_latency: or once a batch runs in at most this fraction (0 to 1) of the starting student's time.
            The search times every candidate beside the starting student's layout and compares their ratio
            with the fraction, so a slow phase of the machine moves both alike
            (:func:`distill.latency.relative_to`); its milliseconds are the start's quietest of the three
            timings that check the target (beside the smallest layout), kept in ``run_dir`` for a resumed run.
        student_checkpoint: a trained student to start from (``distill fit`` checkpoint); without it the
            recipe's student is distilled first for ``initial_epochs``.
        initial_epochs: epochs of that first distillation (default: the recipe's ``max_epochs``).
        slimming_epochs: epochs of KD with an L1 penalty on BatchNorm scales before pruning (0: none).
        slimming_lambda: strength of that penalty.
        importance: pruning criterion (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``hrank``, ``random``).
        schedule: ``fixed`` removes ``ratio`` of the channels per round (seed 004: 0.05, width x0.95), or with a
            latency target ``ratio`` of the latency; ``geometric`` reaches the target in ``rounds`` rounds of equal
            relative size.
        ratio: channels (or latency) removed per round by the fixed schedule (the last round stops at the target).
        rounds: rounds of the geometric schedule.
        max_rounds: give up (with an error) after so many rounds.
        global_ranking: rank channels across layers instead of the same ratio in every layer (size targets; a
            latency target always ranks across layers, by importance per millisecond).
        ignored_layers: student layers whose output channels are never pruned. Those StudentNet's ``width_mult``
            leaves alone (``students.UNSCALED_LAYERS``): ``--ignored_layers '[cnn.0.0, cnn.1.3, cnn.2.3, cnn.7.3]'``.
        ignore_unprunable: keep the channels of the layers whose pruning breaks the student (channels split by sizes
            fixed when it was built: timm's MixNet, LeViT) and prune the rest, instead of refusing the run.
        min_fraction: every layer keeps at least this fraction of its channels before pruning started.
        round_to: kept channel counts are rounded up to a multiple of this. The default, 8, is what the runtimes
            run fast: ONNX Runtime's CPU provider runs counts that are not multiples of 4 up to 3x slower.
        epochs_per_round: distillation epochs after each pruning step.
        lr_rewinding: train each round with the recipe's own learning-rate schedule (warmup, peak, decay)
            compressed into the round, instead of fine-tuning at ``finetune_lr`` (better in every
            comparison of ``benchmarks/prune_recovery.py``).
        finetune_lr: learning rate of the fine-tuning rounds (default: the recipe's ``lr`` / 10), cosine.
        final_epochs: a longer distillation of the last student (0: none), with the recipe's schedule.
        retrain_from_scratch: also train the last student's layout from random weights with KD for the same total
            epochs (Liu et al. 2019); the more accurate of the two on validation is shipped.
        baseline: also distill baselines from scratch for the same total epochs (``baselines``).
        baselines: the students to compare with: numbers are StudentNet ``width_mult`` values (StudentNet
            recipes), names are timm models (timm recipes: the recipe's student with another ``name``). Default:
            for a size target, the widest StudentNet within the pruned student's parameter count whose layers
            ``width_mult`` scales are multiples of ``round_to`` (:func:`students.thin_channels`);
            for a latency target, the two StudentNets of ``width_mult`` 0.25, 0.375, ..., 1.0 whose latencies
            bracket the pruned student's.
        export_onnx: export the best student under the target to ONNX and check it in ONNX Runtime.
        int8: with ``export_onnx``, also quantize it to int8 (``best_student.int8.onnx``, calibrated on the
            training split; ``distill export --int8`` has the calibration options) and measure both files'
            accuracy and latency in ONNX Runtime.
        latency_runtime: where latency is measured (each phase, the target, the final comparison):
            ``onnxruntime`` (CPU), ``onnxruntime-int8``, ``torch-cpu`` (eager) or ``torch-cuda``.
        latency_batch_size: images per forward of that measurement.
        latency_threads: CPU threads of that measurement (default: torch's, usually the machine's cores).
        latency_rounds: interleaved rounds of each timing on ``latency_runtime`` (the target's check, the search,
            the final comparison), whose median is the figure (:class:`distill.latency.LatencyMeter`). Fewer time
            faster (a search: 7 s at 5 rounds, 18 s at 15, on a 2-core CPU; its ratios were no noisier there).
        overrides: values merged into the recipe for every phase (e.g. ``{"data": {"init_args": {...}}}``; a key
            ending in ``+`` extends a list: ``{"trainer": {"callbacks+": [...]}}``).
        run_dir: folder for the phases, ``rounds.csv``, ``pareto.png``, ``summary.md`` and the best student.
        seed: base seed; phase k runs with ``seed + k``.
        cache_teacher_logits: compute the teacher's logits once per deterministic split for all phases.

    Returns:
        The rows of ``rounds.csv``.
    """
    settings = dict(locals())  # the arguments: a run directory resumes only with the same ones
    settings = {k: v for k, v in settings.items() if _ADDED_OPTIONS.get(k, ...) != v}  # runs from before resume
    check_options(target_params, target_macs, importance, schedule, ratio, rounds, max_rounds, epochs_per_round,
                  final_epochs, initial_epochs, slimming_epochs, slimming_lambda, finetune_lr, min_fraction, round_to,
                  seed, target_latency_ms, target_latency)  # fmt: skip
    check_latency_options(latency_runtime, latency_batch_size, export_onnx, latency_threads, latency_rounds)
    check_run_dir(Path(run_dir), "prune-distill")
    # Every check runs before the run directory is touched: a refused run writes nothing and locks nothing.
    base = job_recipe(recipe, overrides)
    if student_checkpoint is not None and not Path(student_checkpoint).is_file():
        raise FileNotFoundError(f"Student checkpoint {student_checkpoint!r} does not exist. Fix the path, or omit it.")
    model, data = check_recipe(base, f"recipe {recipe}" + (" with its overrides" if overrides else ""))
    if student_checkpoint is not None:
        start = load_student(student_checkpoint)
        DistillModule(start).check_data(data)  # its classes and input channels fit the data
    else:
        start = model.student
    del model  # the teacher it holds is loaded again by each phase
    check_baselines(base, baselines)
    x = torch.zeros(1, data.in_chans, *data.input_size)
    meter = LatencyMeter(
        tuple(x.shape[1:]), latency_runtime, latency_batch_size, latency_threads, rounds=latency_rounds
    )
    policy = PruningPolicy(importance, global_ranking, min_fraction=min_fraction, round_to=round_to,
                           ignored_layers=ignored_layers or (), ignore_unprunable=ignore_unprunable)  # fmt: skip
    floors, checked_ms = check_reachable(start, x, policy, target_params, target_macs, schedule, ratio, max_rounds,
                                         target_latency_ms, meter, has_timed_start(Path(run_dir)),
                                         target_latency)  # fmt: skip

    out = Path(run_dir).resolve()
    run = RunState(out, "prune-distill")
    inputs = input_digests(base) | ({student_checkpoint: file_digest(student_checkpoint)} if student_checkpoint else {})
    legacy = json.dumps(base, sort_keys=True, default=str)  # as runs started before 2026-12-07 recorded it
    identities, earlier = recipe_identities(base), run.state.get("inputs", {}).get("recipe")
    identity = earlier if earlier in (*identities[1:], legacy) else identities[0]  # a run started before: as it was
    recorded = {"recipe": identity, "inputs": inputs}  # the files it reads by content: moved with it, the same recipe
    run.hold(settings, recorded, compared_as_contents=("run_dir", "recipe", "overrides", "student_checkpoint"))
    (out / "prune_distill.yaml").write_text(yaml.safe_dump(run.state["settings"], sort_keys=False))
    phases = _Phases(run, base, data, seed, out / "cache" if cache_teacher_logits else None, meter, round_to)
    if target_latency_ms is not None or target_latency is not None:  # the start's time, from the target's check
        start_ms = run.state.setdefault("start_latency_ms", checked_ms)  # a resumed run keeps its own
        target_latency_ms = target_latency_ms or round(target_latency * start_ms, 3)
        run.state["target_latency_ms"] = target_latency_ms
        run.save()
    target = _Target(target_params, target_macs, target_latency_ms, x)

    # ---------------------------------------------------------------- the starting student
    if student_checkpoint is not None:
        current = phases.import_student(student_checkpoint)
    else:
        current = phases.run("initial", 0, initial_epochs or int(base["trainer"].get("max_epochs") or 1))
    if slimming_epochs > 0:
        slim = {"class_path": "distill.pruning.NetworkSlimming", "init_args": {"lambda_": slimming_lambda}}
        current = phases.run("slimming", 0, slimming_epochs, current, callbacks=[slim])

    # -------------------------------------------------------------------------- rounds
    trained_start = current
    done = [r for r in phases.rows if r["phase"] == "round"]  # resuming: continue after the last finished round
    k = done[-1]["round"] if done else 0
    if done:
        current = done[-1]["checkpoint"]
    lr = None if lr_rewinding else (finetune_lr or float(base["model"].get("lr", 2e-3)) / 10)
    if target.latency_ms is not None:  # round goals from the start's latency, timed by the target's check
        goals = latency_goals(schedule, rounds, ratio, start_ms, target.latency_ms)
        # a fraction of the start's time: every timing beside the start, so that a slow phase moves both alike
        search = meter if target_latency is None else relative_to(meter, start, start_ms)
        # A round whose search measured its layout at or under the target itself ends them: the next goals are met,
        # and a round that prunes nothing would still train (seen: 40 epochs of it).
        while k < len(goals) and not (k > 0 and phases.searched_ms(k) <= target.latency_ms):
            k += 1
            pruned = phases.prune(load_student(current), k, policy, floors,
                                  {"target_latency_ms": goals[k - 1], "latency": search})  # fmt: skip
            current = phases.run("round", k, epochs_per_round, pruned, lr=lr)
    else:
        steps = round_schedule(schedule, rounds, ratio, max_rounds, target_params, target_macs)
        start_size = target.size(load_student(trained_start))
        while target.size(student := load_student(current)) > target.value:
            k += 1
            if k > max_rounds:
                raise ValueError(f"the target was not met in max_rounds={max_rounds} rounds; raise it or the ratio")
            step = _toward_target(steps, k, target.size(student), start_size, target.value, target_params is not None)
            current = phases.run("round", k, epochs_per_round, phases.prune(student, k, policy, floors, step), lr=lr)
    last_round = k
    if final_epochs > 0:
        current = phases.run("final", k + 1, final_epochs, current)
    epochs = sum(r["epochs"] for r in phases.rows if r["phase"] not in ("baseline", "scratch"))  # what it went through
    if retrain_from_scratch:
        layout = {"class_path": "students.load_student", "init_args": {"path": current, "train": True,
                                                                      "from_scratch": True}}  # fmt: skip
        phases.run("scratch", k + 2, epochs, student_config=layout)

    # ------------------------------------------------------------------ best and baselines
    under = [r for r in phases.rows if r["phase"] in ("round", "final", "scratch") and target.met(r, last_round)]
    best = max(under, key=lambda r: (r["val_acc"], r["round"]))
    stop_if_terminated(None)  # a SIGTERM swallowed since the last Trainer run: stop before export and report
    onnx_diff = phases.save_best(best["checkpoint"], export_onnx)
    deployed = phases.save_int8(recipe) if export_onnx and int8 else None
    if baseline:
        for key, (label, config) in phases.baseline_configs(baselines, best, target).items():
            phases.run("baseline", 0, epochs, student_config=config, key=key, label=label)
    front = phases.time_side_by_side()
    rows = [{**r, "latency_ms": front[r["checkpoint"]]} for r in phases.rows]
    best = next(r for r in rows if r["checkpoint"] == best["checkpoint"])
    aim = target.describe()
    if target_latency is not None:  # the fraction of the start as timed beside the others here, as the search did
        start_row = next(r for r in rows if r["phase"] in ("start", "initial"))
        aim |= {"value": round(target_latency * start_row["latency_ms"], 3), "fraction": target_latency}
    prune_distill_report(out, rows, best, aim, onnx_diff, deployed, meter.describe(), meter.batch_size)
    release_run_dir(out)  # held since run.hold (a run that failed keeps it until its process ends)
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
    round_to: int = CHANNEL_MULTIPLE,
    seed: int = 0,
    target_latency_ms: float | None = None,
    target_latency: float | None = None,
) -> None:
    """Refuse options of :func:`prune_distill` that are wrong on their own, before any phase starts.

    Each of them reaches a later phase's config; refused there, it would have stopped a run half-way.
    """
    targets = {"target_params": target_params, "target_macs": target_macs, "target_latency_ms": target_latency_ms,
               "target_latency": target_latency}  # fmt: skip
    given = {name: value for name, value in targets.items() if value is not None}
    if len(given) != 1:
        got = " and ".join(f"{name}={value}" for name, value in given.items())
        ways = ", or ".join(" ".join(f"--{o} null" for o in given if o != n) + f" keeps {n}" for n in given)
        fix = f"; got {got}: keep one ({ways})" if given else ""
        raise ValueError(f"give exactly one of target_params, target_macs, target_latency_ms or target_latency{fix}")
    for name, size in (("target_params", target_params), ("target_macs", target_macs)):
        if size is not None and not size >= 1:  # -5 read "cannot be met ... still has 1,078"
            raise ValueError(f"{name} must be a count >= 1, got {size}")
    if target_latency_ms is not None and not 0 < target_latency_ms < math.inf:
        raise ValueError(f"target_latency_ms must be a positive number of milliseconds, got {target_latency_ms}")
    if target_latency is not None and not 0 < target_latency < 1:
        raise ValueError(f"target_latency is a fraction of the student's time: need 0 < target_latency < 1, got "
                         f"{target_latency}")  # fmt: skip
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


def check_latency_options(
    runtime: str, batch_size: int, needs_onnx: bool, threads: int | None = None, rounds: int = LatencyMeter.rounds
) -> None:
    """Refuse a latency runtime, batch size, thread count or number of rounds that cannot be measured here, before
    anything trains."""
    check_runtime(runtime, batch_size, "latency_runtime", "latency_batch_size")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"latency_rounds must be a whole number >= 1 (default {LatencyMeter.rounds}), got {rounds!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"latency_threads must be >= 1 (or omitted: torch's threads), got {threads}")
    if threads is not None and threads > (os.cpu_count() or 1):  # 100000 threads ran out of memory in libgomp
        raise ValueError(f"latency_threads={threads} is more than this machine's {os.cpu_count()} CPUs: give at most "
                         f"that many (or omit it: torch's threads)")  # fmt: skip
    if needs_onnx:
        require_onnxruntime()


def has_timed_start(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that timed its start and trained since (it passed the latency check; its
    settings are compared when it is taken up, and a run with others is refused then). A run that trained
    nothing starts afresh with new settings (:meth:`RunState.hold`), so its start is timed and checked again."""
    try:
        state = json.loads((run_dir / "state.json").read_text())
        return "start_latency_ms" in state and any(key != "start" for key in state["phases"])
    except (OSError, ValueError, TypeError, KeyError):
        return False


def check_reachable(
    student: torch.nn.Module,
    x: torch.Tensor,
    policy: PruningPolicy,
    target_params: int | None,
    target_macs: int | None,
    schedule: str = "geometric",
    ratio: float = 0.05,
    max_rounds: int = 50,
    target_latency_ms: float | None = None,
    latency: LatencyMeter | None = None,
    timed_before: bool = False,
    target_latency: float | None = None,
) -> tuple[dict[str, int], float | None]:
    """Refuse a target that pruning ``student`` under ``policy`` cannot reach; return each group's floor, and
    the student's milliseconds where a latency target was timed now.

    The target must be below the student's size, reachable with every layer at its floor (of the channels
    before pruning starts), and, for the fixed schedule, within ``max_rounds`` rounds. A latency target (or
    ``target_latency``, a fraction of the student's time) is checked by timing the student and its smallest
    layout with ``latency``, unless ``timed_before`` (a run resuming with the same settings passed that check
    when it started; timings near the target would flip).
    """
    floors = policy.floors(channel_counts(student, x, policy.ignored_layers))
    by_latency = target_latency_ms is not None or target_latency is not None
    if by_latency and timed_before:
        return floors, None
    if by_latency:
        start_ms, _ = check_latency_target(student, x, policy, target_latency_ms, latency, floors, target_latency)
        goal = target_latency_ms or round(target_latency * start_ms, 3)
        if schedule == "fixed" and len(latency_goals(schedule, 1, ratio, start_ms, goal)) > max_rounds:
            raise ValueError(
                f"the fixed schedule needs more than max_rounds={max_rounds} rounds of ratio={ratio} to go from "
                f"{start_ms:.3f} to {goal:.3f} ms: raise ratio or max_rounds, or use geometric"
            )
        return floors, start_ms
    by_params = target_params is not None
    target = target_params if by_params else target_macs
    unit = "parameters" if by_params else "MACs"
    start_size = count_params(student) if by_params else count_macs(student, x)
    if start_size <= target:
        raise ValueError(f"target {target:,} {unit} is not below the student's {start_size:,}: nothing to prune")
    check_target(student, x, policy, target_params=target_params, target_macs=target_macs, floors=floors)
    if schedule == "fixed":  # channels shrink both sides of a conv: at best the size falls by (1 - ratio)^2
        needed = math.ceil(math.log(target / start_size) / (2 * math.log(1 - ratio)))
        if needed > max_rounds:
            raise ValueError(
                f"the fixed schedule needs at least {needed} rounds of ratio={ratio} to reach {target:,} {unit} from "
                f"{start_size:,}, more than max_rounds={max_rounds}: raise ratio or max_rounds, or use geometric"
            )
    return floors, None


def latency_goals(schedule: str, rounds: int, ratio: float, start_ms: float, target_ms: float) -> list[float]:
    """Each round's latency goal: ``geometric``, ``rounds`` equal relative steps from the start to the target;
    ``fixed``, ``ratio`` of the latency off per round, the last round stopping at the target."""
    if schedule == "geometric":
        return [*(start_ms * (target_ms / start_ms) ** (k / rounds) for k in range(1, rounds)), target_ms]
    goals = [start_ms * (1 - ratio)]
    while goals[-1] > target_ms:
        goals.append(goals[-1] * (1 - ratio))
    return [*goals[:-1], target_ms]


def check_baselines(recipe: dict[str, Any], baselines: list[float | str] | None) -> None:
    """Refuse baselines the recipe's student cannot be compared with: widths need StudentNet, names a timm student."""
    student = str(recipe["model"]["student"].get("class_path", ""))
    for b in baselines or []:
        if isinstance(b, str) and "create_timm_model" not in student:
            raise ValueError(f"baseline {b!r} is a timm model name: it needs a timm student recipe "
                             f"(model.student: students.create_timm_model), not {student}")  # fmt: skip
        if not isinstance(b, str) and not student.endswith("StudentNet"):
            raise ValueError(f"baseline {b!r} is a width_mult: it needs a StudentNet recipe, not {student}")
        if not isinstance(b, str) and not 0 < b < math.inf:
            raise ValueError(f"baseline {b!r} is not a positive width_mult")
        if isinstance(b, str):
            check_timm_name(b)  # before any phase trains: a misspelt name would stop the run at its baselines


class _Target:
    """What prune-distill aims at: a parameter count, MACs, or milliseconds on the runtime."""

    def __init__(self, params: int | None, macs: int | None, latency_ms: float | None, x: torch.Tensor) -> None:
        self.params, self.macs, self.latency_ms, self.x = params, macs, latency_ms, x
        self.value = next(t for t in (params, macs, latency_ms) if t is not None)

    def size(self, student: torch.nn.Module) -> int:
        """The student's size in the target's unit (parameters or MACs)."""
        return count_params(student) if self.params is not None else count_macs(student, self.x)

    def met(self, row: dict[str, Any], last_round: int) -> bool:
        """Whether a recorded phase's student meets the target: a latency target is met by the last round's layout,
        whose latency the search measured at or under it (a phase's own timing, taken alone, is noisier)."""
        if self.latency_ms is not None:
            return row["round"] >= last_round
        return row["params" if self.params is not None else "macs"] <= self.value

    def describe(self) -> dict[str, Any]:
        unit = "parameters" if self.params is not None else "MACs" if self.macs is not None else "ms"
        return {"value": self.value, "unit": unit}


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
        self,
        run: RunState,
        base: dict[str, Any],
        data: Any,
        seed: int,
        cache: Path | None,
        meter: LatencyMeter,
        round_to: int,
    ) -> None:
        self.run_state = run
        self.round_to = round_to
        self.meter = meter
        self.out = run.folder
        self.base = base
        self.data = data
        self.seed = seed
        self.cache = cache
        self.x = torch.zeros(1, data.in_chans, *data.input_size)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.run_state.phases.values(), key=lambda r: (r["round"], r["phase"] == "final"))

    def _record(self, key: str, round_: int, phase: str, epochs: int, checkpoint: str, label: str | None = None,
                **accuracies: float) -> str:  # fmt: skip
        """Measure the phase's student and record it: size, accuracies, checkpoint (latency: every student timed side
        by side at the end, :meth:`time_side_by_side`)."""
        model = load_student(checkpoint)
        label = label or phase_label({"round": round_, "phase": phase})
        row = {"round": round_, "phase": phase, "student": label, "epochs": epochs,
               "params": count_params(model), "macs": count_macs(model, self.x),
               **accuracies, "checkpoint": checkpoint}  # fmt: skip
        self.run_state.record(key, row)
        return checkpoint

    def import_student(self, path: str) -> str:
        """Copy a trained student into the run as phase 0 (so that resuming needs nothing outside it)."""
        if "start" not in self.run_state.phases:
            copy_path = save_student(load_student(path), self.out / "start.ckpt", input_shape=list(self.x.shape[1:]))
            epochs = int(read_checkpoint(path).get("epoch", -1)) + 1  # Lightning records the 0-based epoch
            val_acc, test_acc = self.evaluate(str(copy_path))  # what pruning starts from, as the phases are scored
            self._record("start", 0, "start", epochs, str(copy_path), val_acc=val_acc, test_acc=test_acc)
        return self.run_state.phases["start"]["checkpoint"]

    def evaluate(self, checkpoint: str) -> tuple[float, float]:
        """A student's validation and test accuracy on the run's data, with the recipe's accelerator and precision,
        over the batches its phases are scored on (its ``limit_val_batches`` and ``limit_test_batches``)."""
        recipe = self.base["trainer"]
        kept = ("accelerator", "precision", "limit_val_batches", "limit_test_batches")
        trainer = Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, **{k: recipe[k] for k in kept if k in recipe})  # fmt: skip
        module = DistillModule(load_student(checkpoint))
        val = trainer.validate(module, datamodule=self.data, verbose=False)
        stop_if_terminated(trainer)
        test = trainer.test(module, datamodule=self.data, verbose=False)
        stop_if_terminated(trainer)
        return float(val[0]["val/acc"]), float(test[0]["test/acc"])

    def searched_ms(self, k: int) -> float:
        """The milliseconds the latency search measured round ``k``'s layout at (infinite where it did not)."""
        searched = self.run_state.state.get("pruned", {}).get(str(k), {}).get("searched_ms")
        return math.inf if searched is None else searched

    def prune(self, student: torch.nn.Module, k: int, policy: PruningPolicy, floors: dict, step: dict) -> str:
        """Prune ``student`` by round ``k``'s step, once; the pruned student's checkpoint.

        The pruned student is recorded (with the latency the search measured), so that a run killed while the round
        trained resumes from the same layout: a latency search measures again, on a machine that may be noisier.
        """
        pruned = self.run_state.state.setdefault("pruned", {})
        path = self.out / f"round{k}_pruned.ckpt"  # not in round{k}/, the phase's folder
        if str(k) in pruned and path.is_file() and file_digest(str(path)) == pruned[str(k)]["digest"]:
            return str(path)
        torch.manual_seed(self.seed + k)
        batches = labelled_batches(self.data.train_dataloader(), policy.num_batches)  # for data-driven criteria
        kept = self.run_state.state.setdefault("kept_layers", [])  # found in a round before (ignore_unprunable)
        policy = policy.keeping(kept)
        report = prune_student(student, self.x, policy, floors=floors, data=batches, **step)
        if report.kept_layers:
            kept += report.kept_layers
            print(f"round {k}: kept whole, as pruning them broke the student: {', '.join(kept)}")
        save_student(student, path)
        pruned[str(k)] = {"digest": file_digest(str(path)), "searched_ms": report.latency_ms}
        self.run_state.save()
        return str(path)

    def run(
        self,
        phase: str,
        round_: int,
        epochs: int,
        student: str | None = None,
        lr: float | None = None,
        callbacks: list[dict] | None = None,
        student_config: dict | None = None,
        key: str | None = None,
        label: str | None = None,
    ) -> str:
        """Run one ``distill fit`` phase (or find it recorded); its best checkpoint."""
        key = key or (phase if phase in ("initial", "slimming", "final", "scratch") else f"round{round_}")
        if key in self.run_state.phases:
            return self.run_state.phases[key]["checkpoint"]
        folder = self.out / key
        cfg = relocate(self.base, folder)
        cfg["seed_everything"] = self.seed + round_ + {"baseline": 1000, "scratch": 2000}.get(phase, 0)
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
        result = fit_recipe(cfg, root=self.out)
        return self._record(key, round_, phase, epochs, result.checkpoint, label, val_acc=result.val_acc,
                            test_acc=result.test_acc)  # fmt: skip

    def save_best(self, checkpoint: str, export_onnx: bool) -> float | None:
        """Save the best student as ``best_student.ckpt`` (and ``.onnx``, then ONNX Runtime's largest difference
        from PyTorch is returned), once: a rerun finds them recorded, unless a run before this version wrote them
        without what they must say of their data (:func:`~distill.export.deployment_metadata`)."""
        state = self.run_state.state
        path, onnx = self.out / "best_student.ckpt", self.out / "best_student.onnx"
        model = load_student(checkpoint)
        metadata = deployment_metadata(model.trained_on, list(self.x.shape[1:]))
        saved = state.get("best") == checkpoint and state.get("best_metadata") == metadata and path.is_file()
        if not (saved and (onnx.is_file() or not export_onnx)):
            save_student(model, path, input_shape=list(self.x.shape[1:]), data=model.trained_on)
            if export_onnx:
                state["onnx_max_abs_diff"] = to_onnx(model, self.x, onnx, metadata=metadata)
                state.pop("int8", None)  # quantized from the file it replaces
            state["best"], state["best_metadata"] = checkpoint, metadata
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
            ms = compare_latency(files, self.x.shape[1:], "onnxruntime", self.meter.batch_size, self.meter.threads)
            state["int8"] = {**result, "float_latency_ms": ms["float32"], "int8_latency_ms": ms["int8"],
                             "best": state["best"]}  # fmt: skip
            self.run_state.save()
        return state["int8"]

    def baseline_configs(
        self, baselines: list[float | str] | None, best: dict[str, Any], target: _Target
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        """The baselines' labels and student configs, by phase key (see ``baselines`` of :func:`prune_distill`)."""
        student = self.base["model"]["student"]
        init_args = dict(student.get("init_args") or {})
        studentnet = str(student.get("class_path", "")).endswith("StudentNet")
        if baselines is None and not studentnet:
            return {}
        if baselines is None and target.latency_ms is None:  # the StudentNet of the best student's parameters
            args = {k: v for k, v in init_args.items() if k != "channels"}
            width = width_for_params(best["params"], **args, num_classes=self.data.num_classes,
                                     in_chans=self.data.in_chans)  # fmt: skip
            return {} if width is None else self.thin(width, best["params"], args)
        elif baselines is None:
            baselines = self.bracket(best["checkpoint"], init_args)
        configs = {}
        for b in baselines:
            if isinstance(b, str):
                config = {**student, "init_args": {**init_args, "name": b}}
                configs[f"baseline_{b}"] = (f"{b}, KD from scratch", config)
            else:
                args = {k: v for k, v in init_args.items() if k != "channels"} | {"width_mult": float(b)}
                config = {"class_path": "students.StudentNet", "init_args": args}
                configs[f"baseline_w{b:g}"] = (f"StudentNet width_mult={b:g}, KD from scratch", config)
        return configs

    def thin(self, width: float, params: int, args: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The thin StudentNet of ``params`` parameters whose scaled layers are multiples of ``round_to``, as the
        pruned student's are (:func:`students.thin_channels`: odd channel counts would make the pruned student look
        fast), named by the ``width_mult`` whose channels it has; of ``width`` (unrounded) where there is none, or
        where a run started before trained that one."""
        earlier = f"baseline_w{width:g}" in self.run_state.phases
        data = {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans}
        channels = None if earlier else thin_channels(params, self.round_to, **args, **data)  # width_mult: the widest
        args = {k: v for k, v in args.items() if k != "width_mult"}
        if channels is None:
            config = {"class_path": "students.StudentNet", "init_args": {**args, "width_mult": width}}
            return {f"baseline_w{width:g}": (f"StudentNet width_mult={width:g}, KD from scratch", config)}
        config = {"class_path": "students.StudentNet", "init_args": {**args, "channels": channels}}
        rounded = channels[3] / studentnet_channels(args.get("base", 16))[3]  # the width_mult these channels are
        return {f"baseline_w{rounded:g}": (f"StudentNet width_mult={rounded:g}, KD from scratch", config)}

    def bracket(self, checkpoint: str, init_args: dict[str, Any]) -> list[float]:
        """The two widths of 0.25, 0.375, ..., 1.0 whose StudentNets run just faster and just slower than the student
        in ``checkpoint``, timed side by side with it once (a rerun finds them recorded)."""
        state = self.run_state.state
        if state.get("bracket", {}).get("of") != checkpoint:
            args = {k: v for k, v in init_args.items() if k not in ("channels", "width_mult")}
            args |= {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans}
            widths = [0.25 + 0.125 * i for i in range(7)]
            models = {f"{w:g}": StudentNet(**args, width_mult=w) for w in widths}
            ms = self.meter({"pruned": load_student(checkpoint), **models})
            faster = [w for w in widths if ms[f"{w:g}"] <= ms["pruned"]]
            slower = [w for w in widths if ms[f"{w:g}"] > ms["pruned"]]
            chosen = ([max(faster)] if faster else []) + ([min(slower)] if slower else [])
            state["bracket"] = {"of": checkpoint, "widths": chosen, "ms": ms}
            self.run_state.save()
        return state["bracket"]["widths"]

    def time_side_by_side(self) -> dict[str, float]:
        """Every recorded student timed side by side on the run's runtime, once (a rerun finds the figures)."""
        state = self.run_state.state
        checkpoints = sorted({r["checkpoint"] for r in self.rows})
        if state.get("front", {}).get("checkpoints") != checkpoints:
            ms = self.meter({c: load_student(c) for c in checkpoints})
            state["front"] = {"checkpoints": checkpoints, "ms": ms}
            self.run_state.save()
        return state["front"]["ms"]
