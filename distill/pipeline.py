"""``distill prune-distill``: the most accurate student under a size target.

The classic schedule is train, prune, fine-tune at a low learning rate, iterated with a growing
ratio (Han et al. 2015; seeds 001 and 002). Here every fine-tuning phase is a distillation phase from
the frozen teacher, as in seed 004's homework. Rounds repeat until the target (parameters or MACs)
is met:

1. prune the student by the round's amount, with any criterion of :mod:`distill.pruning`;
2. distill it for ``epochs_per_round`` epochs, at a fine-tune learning rate or with the recipe's
   original schedule again (learning-rate rewinding, Renda et al. 2020);
3. evaluate it: parameters, MACs, CPU latency, validation and test accuracy.

An optional network-slimming phase (Liu et al. 2017) comes first and a longer distillation last. The
honest baseline is trained beside it: a StudentNet whose ``width_mult`` gives the same parameter
count, distilled from scratch for the same total epochs. Every phase is its own ``distill fit`` run
with its exact config in the run directory, and is recorded when it ends: a killed run resumes after
the last finished phase and, phases being seeded, ends with the same student.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.module import DistillModule
from distill.profile import count_macs, count_params, measure_latency
from distill.recipes import (
    changed_settings,
    check_recipe,
    check_teacher,
    file_digest,
    fit_recipe,
    input_digests,
    load_recipe,
    merge,
    relocate,
    sibling_config,
)
from distill.report import atomic_write, save_figure
from students import load_student

__all__ = ["SCHEDULES", "check_options", "check_reachable", "prune_distill"]

SCHEDULES = ("fixed", "geometric")
ROUND_COLUMNS = ("round", "phase", "epochs", "params", "macs", "latency_ms", "val_acc", "test_acc", "checkpoint")


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
    # Every check runs before the run directory is touched: a refused run writes nothing and locks nothing.
    base = merge(load_recipe(recipe), overrides)
    check_teacher(base, recipe)
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
    ignored = list(ignored_layers or [])
    floors = check_reachable(start, x, target_params, target_macs, min_fraction, round_to, ignored, schedule, ratio,
                             max_rounds)  # fmt: skip
    by_params = target_params is not None
    size = count_params if by_params else (lambda m: count_macs(m, x))
    target = target_params if by_params else target_macs
    unit = "parameters" if by_params else "MACs"

    out = Path(run_dir).resolve()
    job = _Job(out, base, data, seed, str(out / "cache") if cache_teacher_logits else None)
    inputs = input_digests(base) | ({student_checkpoint: file_digest(student_checkpoint)} if student_checkpoint else {})
    job.remember_settings(settings, {"recipe": json.dumps(base, sort_keys=True, default=str), "inputs": inputs})

    # ---------------------------------------------------------------- the starting student
    recipe_epochs = int(base.get("trainer", {}).get("max_epochs") or 1)
    if student_checkpoint is not None:
        current = job.import_student(student_checkpoint)
    else:
        epochs = initial_epochs or recipe_epochs
        current = job.phase("initial", round_=0, epochs=epochs, student=None).checkpoint
    if slimming_epochs > 0:
        slim = {"class_path": "distill.pruning.NetworkSlimming", "init_args": {"lambda_": slimming_lambda}}
        current = job.phase("slimming", 0, slimming_epochs, current, callbacks=[slim]).checkpoint
    start_size = size(job.load(current))  # the trained student, before the first round (also when resuming)

    # -------------------------------------------------------------------------- rounds
    done = job.rows_of("round")  # resuming: continue after the last finished round
    k = done[-1]["round"] if done else 0
    if done:
        current = done[-1]["checkpoint"]
    while size(job.load(current)) > target:
        k += 1
        if k > max_rounds:
            raise ValueError(f"the target was not met in max_rounds={max_rounds} rounds; raise it or the ratio")
        student = job.load(current)
        step = _round_step(schedule, size(student), start_size, target, k, rounds, ratio, by_params)
        pruned = job.prune(student, k, importance, step, global_ranking, floors, round_to, ignored)
        lr = None if lr_rewinding else (finetune_lr or float(base["model"].get("lr", 2e-3)) / 10)
        current = job.phase("round", k, epochs_per_round, pruned, lr=lr).checkpoint
    if final_epochs > 0:
        current = job.phase("final", k + 1, final_epochs, current).checkpoint

    # ------------------------------------------------------------------ best and baseline
    under = [r for r in job.rows if r["phase"] in ("round", "final") and r[_unit_key(target_params)] <= target]
    best = max(under, key=lambda r: (r["val_acc"], r["round"]))
    best_path = job.save_best(best["checkpoint"], export_onnx)
    thin = None
    if baseline:  # the same epochs as everything the pruned student went through (its start included)
        spent = sum(r["epochs"] for r in job.rows if r["phase"] != "baseline")
        thin = job.baseline(best["params"], spent)
    rows = job.rows
    job.write_report(best, best_path, thin, target, unit)
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
    from distill.pruning import CRITERIA

    if (target_params is None) == (target_macs is None):
        raise ValueError("give exactly one of target_params or target_macs")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
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


def check_reachable(
    student: torch.nn.Module,
    x: torch.Tensor,
    target_params: int | None,
    target_macs: int | None,
    min_fraction: float = 0.1,
    round_to: int = 1,
    ignored: list[str] | None = None,
    schedule: str = "geometric",
    ratio: float = 0.05,
    max_rounds: int = 50,
) -> dict[str, int]:
    """Refuse a target that pruning ``student`` cannot reach; return each prunable layer's floor.

    The target must be below the student's size, reachable with every layer at its floor, and, for the
    fixed schedule, within ``max_rounds`` rounds.
    """
    from distill.pruning import check_target

    by_params = target_params is not None
    target = target_params if by_params else target_macs
    unit = "parameters" if by_params else "MACs"
    start_size = count_params(student) if by_params else count_macs(student, x)
    if start_size <= target:
        raise ValueError(f"target {target:,} {unit} is not below the student's {start_size:,}: nothing to prune")
    ignored = list(ignored or [])
    floors = _floors(student, x, min_fraction, ignored)
    check_target(student, x, target_params, target_macs, floors, round_to=round_to, ignored_layers=ignored)
    if schedule == "fixed":  # channels shrink both sides of a conv: at best the size falls by (1 - ratio)^2
        needed = math.ceil(math.log(target / start_size) / (2 * math.log(1 - ratio)))
        if needed > max_rounds:
            raise ValueError(
                f"the fixed schedule needs at least {needed} rounds of ratio={ratio} to reach {target:,} {unit} from "
                f"{start_size:,}, more than max_rounds={max_rounds}: raise ratio or max_rounds, or use geometric"
            )
    return floors


def _floors(student: torch.nn.Module, x: torch.Tensor, min_fraction: float, ignored: list[str]) -> dict[str, int]:
    """Channels each prunable layer keeps at least: ``min_fraction`` of its channels before pruning started."""
    from distill.pruning import channel_groups

    groups = channel_groups(student, x, ignored)
    return {name: max(1, math.ceil(min_fraction * len(g[0][1]))) for name, g in groups.items()}


def _unit_key(target_params: int | None) -> str:
    return "params" if target_params is not None else "macs"


def _round_step(
    schedule: str, now: int, start: int, target: int, k: int, rounds: int, ratio: float, by_params: bool
) -> dict[str, Any]:
    """What round ``k`` prunes: a ratio of the channels, or a size to reach, never below the target."""
    key = "target_params" if by_params else "target_macs"
    if schedule == "geometric":
        goal = target if k >= rounds else max(target, round(start * (target / start) ** (k / rounds)))
        return {key: goal} if goal < now else {key: target}
    # fixed: remove `ratio` of the channels; channels shrink both sides of a conv, so the size about squares
    if now * (1 - ratio) ** 2 <= target:
        return {key: target}
    return {"ratio": ratio}


class _Job:
    """The run directory: phases, their records (``state.json``), and the report."""

    def __init__(self, out: Path, base: dict[str, Any], data: Any, seed: int, cache: str | None) -> None:
        self.out = out
        self.base = base
        self.data = data
        self.seed = seed
        self.cache = cache
        self.state_path = out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"phases": {}}

    # ------------------------------------------------------------------ bookkeeping
    def remember_settings(self, settings: dict[str, Any], inputs: dict[str, Any]) -> None:
        """Record the run's settings and inputs (the recipe's content, the files it reads); refuse other ones.

        Only a run that trained something is held to its settings: a run that stopped before its first
        phase ended (bad input found late, a crash) starts again with the new ones. A run recorded before
        inputs were (an older version) resumes, and records them from now on.
        """
        settings = json.loads(json.dumps(settings, default=str))

        def compared(values: dict[str, Any]) -> dict[str, Any]:  # paths: their contents are compared instead
            return {k: v for k, v in values.items() if k not in ("run_dir", "recipe", "student_checkpoint")}

        changed = changed_settings(compared(self.state.get("settings", settings)), compared(settings))
        recorded = self.state.get("inputs", inputs)
        moved = ["the content of the recipe"] if recorded["recipe"] != inputs["recipe"] else []
        if sorted(recorded["inputs"].values()) != sorted(inputs["inputs"].values()):
            moved.append(f"a file it reads ({', '.join(inputs['inputs'])})")
        trained = any(key != "start" for key in self.state["phases"])  # "start" only copies student_checkpoint
        if trained and changed:  # an option added since the run started reads as None there
            raise ValueError(
                f"{self.out} holds a prune-distill run with other settings ({', '.join(changed)} changed). "
                f"Use a new run_dir, or rerun with the original settings to resume it."
            )
        if trained and moved:
            raise ValueError(
                f"{self.out} holds a prune-distill run of other inputs ({', '.join(moved)} changed since it "
                f"started): resuming would mix them in one run. Use a new run_dir, or restore the original inputs."
            )
        if changed or moved:
            self.state = {"phases": {}}  # nothing trained yet: start afresh with these settings
        self.state["settings"], self.state["inputs"] = settings, inputs
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "prune_distill.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        self._save_state()

    def _save_state(self) -> None:
        atomic_write(self.state_path, lambda f: json.dump(self.state, f, indent=1))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.state["phases"].values(), key=lambda r: (r["round"], r["phase"] == "final"))

    def rows_of(self, phase: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["phase"] == phase]

    # ------------------------------------------------------------------------ models
    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, self.data.in_chans, *self.data.input_size)

    @staticmethod
    def load(path: str) -> torch.nn.Module:
        from students import load_student

        return load_student(path)

    def import_student(self, path: str) -> str:
        """Copy a trained student into the run as phase 0 (so that resuming needs nothing outside it)."""
        from students import load_student, save_student

        key = "start"
        if key not in self.state["phases"]:
            from students.checkpoint import read_checkpoint

            student = load_student(path)
            shape = list(self.example_input().shape[1:])
            copy_path = save_student(student, self.out / "start.ckpt", input_shape=shape)
            epochs = int(read_checkpoint(path).get("epoch", -1)) + 1  # Lightning records the 0-based epoch
            self._record(key, 0, "start", epochs, str(copy_path), student, val_acc=float("nan"), test_acc=float("nan"))
        return self.state["phases"][key]["checkpoint"]

    def prune(
        self,
        student: torch.nn.Module,
        k: int,
        importance: str,
        step: dict[str, Any],
        global_ranking: bool,
        floors: dict[str, int],
        round_to: int,
        ignored: list[str],
    ) -> str:
        from distill.pruning import prune_student
        from students import save_student

        torch.manual_seed(self.seed + k)
        batches = [next(iter(self.data.train_dataloader()))[:2] for _ in range(4)]
        prune_student(
            student,
            self.example_input(),
            importance,
            global_ranking=global_ranking,
            min_channels=floors,
            round_to=round_to,
            ignored_layers=ignored,
            data=batches,
            **step,
        )
        return str(save_student(student, self.out / f"round{k}_pruned.ckpt"))  # not in round{k}/, the phase's folder

    # ------------------------------------------------------------------------ phases
    def phase(
        self,
        phase: str,
        round_: int,
        epochs: int,
        student: str | None,
        lr: float | None = None,
        callbacks: list[dict] | None = None,
        name: str | None = None,
        student_config: dict | None = None,
    ) -> Any:
        """Run one ``distill fit`` phase (or return its record if it already finished)."""
        key = name or (phase if phase in ("initial", "slimming", "final", "baseline") else f"round{round_}")
        if key in self.state["phases"]:
            return _Record(self.state["phases"][key])
        folder = self.out / key
        cfg = relocate(self.base, folder)
        cfg["seed_everything"] = self.seed + round_ + (1000 if phase == "baseline" else 0)
        cfg["trainer"]["max_epochs"] = epochs
        if student is not None:
            cfg["model"]["student"] = {
                "class_path": "students.load_student",
                "init_args": {"path": student, "train": True},
            }
        if student_config is not None:
            cfg["model"]["student"] = student_config
        if lr is not None:  # fine-tuning: a lower peak, no warmup, cosine over the phase
            cfg["model"].update(lr=lr, warmup_epochs=0)
        else:
            cfg["model"]["warmup_epochs"] = min(float(cfg["model"].get("warmup_epochs", 0)), epochs / 4)
        extra = list(callbacks or [])
        if self.cache is not None:
            extra.append({"class_path": "distill.cache.TeacherLogitCache", "init_args": {"cache_dir": self.cache}})
        cfg["trainer"]["callbacks"] = [*(cfg["trainer"].get("callbacks") or []), *extra]
        result = fit_recipe(cfg, sibling_config(folder))
        model = self.load(result.checkpoint)
        self._record(key, round_, phase, epochs, result.checkpoint, model, result.val_acc, result.test_acc)
        return _Record(self.state["phases"][key])

    def _record(
        self,
        key: str,
        round_: int,
        phase: str,
        epochs: int,
        checkpoint: str,
        model: torch.nn.Module,
        val_acc: float,
        test_acc: float,
    ) -> None:
        x = self.example_input()
        self.state["phases"][key] = {
            "round": round_,
            "phase": phase,
            "epochs": epochs,
            "params": count_params(model),
            "macs": count_macs(model, x),
            "latency_ms": round(measure_latency(model, x, warmup=5, repeats=30), 3),
            "val_acc": val_acc,
            "test_acc": test_acc,
            "checkpoint": checkpoint,
        }
        self._save_state()

    # ------------------------------------------------------------------- outputs
    def save_best(self, checkpoint: str, export_onnx: bool) -> Path:
        """Save the best student as ``best_student.ckpt`` (and ``.onnx``), once: a rerun finds it recorded."""
        from students import save_student

        path, onnx = self.out / "best_student.ckpt", self.out / "best_student.onnx"
        if self.state.get("best") == checkpoint and path.is_file() and (onnx.is_file() or not export_onnx):
            return path
        model = self.load(checkpoint)
        save_student(model, path, input_shape=list(self.example_input().shape[1:]))
        if export_onnx:
            from distill.export import export_onnx as to_onnx

            self.state["onnx_max_abs_diff"] = to_onnx(model, self.example_input(), onnx)
        self.state["best"] = checkpoint
        self._save_state()
        return path

    def baseline(self, params: int, epochs: int) -> dict[str, Any] | None:
        """A StudentNet with the largest width_mult whose parameters do not exceed ``params``, KD from scratch."""
        from students import StudentNet

        student = self.base["model"]["student"]
        if not str(student.get("class_path", "")).endswith("StudentNet"):
            return None
        kwargs = dict(student.get("init_args") or {})
        data = self.data

        def count(width: float) -> int:
            return count_params(
                StudentNet(**{**kwargs, "width_mult": width}, num_classes=data.num_classes, in_chans=data.in_chans)
            )

        lo, hi = 0.01, float(kwargs.get("width_mult", 1.0))
        if count(lo) > params:
            return None
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if count(mid) <= params else (lo, mid)
        width = math.floor(lo * 1e4) / 1e4  # rounded down: never more parameters than the pruned student
        config = {"class_path": "students.StudentNet", "init_args": {**kwargs, "width_mult": width}}
        self.phase("baseline", 0, epochs, None, student_config=config, name="baseline")
        return {**self.state["phases"]["baseline"], "width_mult": width}

    def write_report(self, best: dict[str, Any], best_path: Path, thin: dict | None, target: int, unit: str) -> None:
        rows = [r for r in self.rows if r["phase"] != "baseline"]

        def write_csv(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=ROUND_COLUMNS)
            writer.writeheader()
            for r in [*rows, *([thin] if thin else [])]:
                writer.writerow({c: r[c] for c in ROUND_COLUMNS})

        atomic_write(self.out / "rounds.csv", write_csv)
        _pareto(self.out / "pareto.png", rows, thin, best, target if unit == "parameters" else None)

        def acc(value: float) -> str:
            return "-" if math.isnan(value) else f"{value:.4f}"

        def line(r: dict[str, Any], label: str) -> str:
            return (
                f"| {label} | {r['params']:,} | {r['macs']:,} | {r['latency_ms']:.3f} | {acc(r['val_acc'])} | "
                f"{acc(r['test_acc'])} | {r['epochs']} |"
            )

        table = [
            "| phase | params | MACs | CPU latency (ms, batch 1) | val acc | test acc | epochs |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(line(r, _label(r)) for r in rows),
        ]
        if thin:
            table.append(line(thin, f"thin StudentNet (width_mult={thin['width_mult']}), KD from scratch"))
        verdict = (
            f"Best student under {target:,} {unit}: {_label(best)} "
            f"({best['params']:,} parameters, test acc {best['test_acc']:.4f}), saved as {best_path.name}"
        )
        if "onnx_max_abs_diff" in self.state:
            verdict += (
                f" and best_student.onnx (ONNX Runtime matches PyTorch within {self.state['onnx_max_abs_diff']:.1e})"
            )
        verdict += "."
        if thin:
            delta = 100 * (best["test_acc"] - thin["test_acc"])
            verdict += (
                f" The thin StudentNet of {thin['params']:,} parameters, distilled from scratch for the same "
                f"{thin['epochs']} epochs, reaches {thin['test_acc']:.4f}: prune-distill is {delta:+.2f} points."
            )
        text = "\n".join(table)
        md = (
            "# Prune-then-distill\n\n"
            + text
            + "\n\n"
            + verdict
            + "\n\nAccuracies: the best validation epoch of each phase; test is reported, never used to choose.\n\n"
            + "Reproduce (resumes if the run directory exists): `distill prune-distill --config prune_distill.yaml`.\n"
        )
        (self.out / "summary.md").write_text(md)
        print("\n" + text + "\n\n" + verdict + f"\n\nWritten: {self.out}/{{rounds.csv,pareto.png,summary.md}}")


def _label(row: dict[str, Any]) -> str:
    return f"round {row['round']}" if row["phase"] == "round" else row["phase"]


class _Record:
    def __init__(self, row: dict[str, Any]) -> None:
        self.checkpoint = row["checkpoint"]


def _pareto(
    path: Path, rows: list[dict[str, Any]], thin: dict | None, best: dict[str, Any], target: int | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shown = [r for r in rows if not math.isnan(r["test_acc"])]
    ax.plot([r["params"] for r in shown], [r["test_acc"] for r in shown], marker="o", label="prune-distill (test)")
    ax.plot(
        [r["params"] for r in shown],
        [r["val_acc"] for r in shown],
        marker=".",
        linestyle=":",
        label="prune-distill (val)",
    )
    for r in shown:
        ax.annotate(_label(r), (r["params"], r["test_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter(
        [best["params"]], [best["test_acc"]], s=120, facecolors="none", edgecolors="red", label="best under target"
    )
    if thin:
        ax.scatter(
            [thin["params"]],
            [thin["test_acc"]],
            marker="*",
            s=140,
            color="black",
            label="thin StudentNet, KD from scratch",
        )
    if target is not None:
        ax.axvline(target, color="gray", linestyle="--", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
