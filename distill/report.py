"""The jobs' reports: a CSV of every run, a Markdown table with a verdict, and a plot.

Each job writes them into its run directory atomically (:mod:`distill.rundir`) and prints the table.
``distill sweep`` summarises seeds per (variant, loss, temperature, alpha); ``distill prune-distill`` tabulates its
rounds beside its baselines, plotted against latency; ``distill quickstart`` puts its four models in one table.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from distill.rundir import atomic_path, atomic_write

__all__ = [
    "against_baselines",
    "markdown_table",
    "prune_distill_report",
    "quickstart_table",
    "save_figure",
    "sweep_report",
    "write_csv",
]

SWEEP_COLUMNS = (
    "kind",
    "variant",
    "loss",
    "temperature",
    "alpha",
    "seed",
    "val_acc",
    "test_acc",
    "epochs",
    "wall_s",
    "trial",
    "checkpoint",
)
ROUND_COLUMNS = (
    "round", "phase", "student", "epochs", "params", "macs", "latency_ms", "val_acc", "test_acc", "checkpoint",
)  # fmt: skip


# ------------------------------------------------------------------------------ the formats
def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` (their ``columns``, other keys left out) as a CSV file, atomically."""

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2))


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty plot
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _written(out: Path, table: str, verdict: str, files: str) -> None:
    print("\n" + table + ("\n\n" + verdict if verdict else "") + f"\n\nWritten: {out}/{files}")


# ----------------------------------------------------------------------------------- sweep
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict | None, dict | None]:
    """Mean and spread over seeds per (variant, loss, temperature, alpha) in the rows' order, the best on
    validation, and the CE-only student."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "kd":
            groups.setdefault((r["variant"], r["loss"], r["temperature"], r["alpha"]), []).append(r)

    def stats(members: list[dict[str, Any]]) -> dict[str, Any]:
        val, val_sd = _mean_std([m["val_acc"] for m in members])
        test, test_sd = _mean_std([m["test_acc"] for m in members])
        return {"n": len(members), "val": val, "val_sd": val_sd, "test": test, "test_sd": test_sd}

    table = [
        {"variant": v, "loss": loss, "temperature": t, "alpha": a, **stats(members)}
        for (v, loss, t, a), members in groups.items()
    ]
    best = max(table, key=lambda r: (r["val"], -r["temperature"]), default=None)
    ce_rows = [r for r in rows if r["kind"] == "ce"]
    return table, best, stats(ce_rows) if ce_rows else None


def _setting(row: dict[str, Any], variant: bool = True, temperature: bool = True) -> str:
    """``ema, DKDLoss, T=4`` or ``KDLoss, T=4, alpha=0.9``: what a table row trained."""
    parts = [row["variant"]] if variant else []
    parts.append(row["loss"])
    parts += [f"T={row['temperature']:g}"] if temperature else []
    parts += [f"alpha={row['alpha']:g}"] if row["alpha"] != "" else []
    return ", ".join(parts)


def sweep_report(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], missing: list[str]) -> None:
    """``sweep.csv``, ``sweep.md`` (with what is missing, if anything) and ``sweep.png`` in ``out``."""
    table, best, ce = _summarise(rows)
    write_csv(out / "sweep.csv", SWEEP_COLUMNS, rows)
    variants = list(settings.get("variants") or {"recipe": {}})  # as configured: the first is the reference
    reference = (
        {(r["loss"], r["temperature"], r["alpha"]): r for r in table if r["variant"] == variants[0]} if table else {}
    )

    def accuracies(r: dict[str, Any]) -> list[str]:
        return [f"{r['val']:.4f} ± {r['val_sd']:.4f}", f"{r['test']:.4f} ± {r['test_sd']:.4f}"]

    several = len(variants) > 1

    def versus(r: dict[str, Any]) -> list[str]:  # the test accuracy's difference from the first variant, in points
        if not several:
            return []
        ref = reference.get((r["loss"], r["temperature"], r["alpha"]))
        return ["-" if ref is None or ref is r else f"{100 * (r['test'] - ref['test']):+.2f}"]

    def alpha(r: dict[str, Any]) -> str:
        return "-" if r["alpha"] == "" else f"{r['alpha']:g}"

    lines = [[*([r["variant"]] if several else []), r["loss"], f"{r['temperature']:g}", alpha(r), r["n"],
              *accuracies(r), *versus(r)] for r in table]  # fmt: skip
    lines += (
        [[*(["-"] if several else []), "CE only", "-", "-", ce["n"], *accuracies(ce), *(["-"] if several else [])]]
        if ce
        else []
    )
    header = ["loss", "T", "alpha", "seeds", "val acc (mean ± std)", "test acc (mean ± std)"]
    if several:
        header = ["variant", *header, f"test vs {variants[0]} (points)"]
    text = markdown_table(header, "l" * several + "lrrrrr" + "r" * several, lines)
    verdict = []
    if missing:
        verdict.append(
            f"**Incomplete: {len(missing)} grid point(s) not finished** ({'; '.join(missing)}); the results below "
            f"are of the finished points only. Run the same command again to finish the grid."
        )
    if best:
        verdict.append(
            f"Best on validation{' so far' if missing else ''}: {_setting(best, several)} "
            f"(val {best['val']:.4f}); its test accuracy: {best['test']:.4f} ± {best['test_sd']:.4f}."
        )
        if ce:
            verdict.append(
                f"Against the CE-only student: {100 * (best['test'] - ce['test']):+.2f} points of test accuracy."
            )
    masked = "***" in unquote(str(settings.get("storage")))  # the URL's password, hidden (in its query: quoted)
    password = ", with the storage's password in place of `***`" if masked else ""
    md = (
        f"# Distillation sweep\n\n{text}\n\n{' '.join(verdict)}\n\n"
        "The setting is chosen on the validation split; the test split only reports it.\n\n"
        f"Reproduce (resumes if the run directory exists), from `{Path.cwd()}`{password}:\n\n```bash\n"
        f"distill sweep --config {out / 'sweep.yaml'}\n```\n\n"
        f"with `sweep.yaml`:\n\n```yaml\n{yaml.safe_dump(settings, sort_keys=False)}```\n"
    )
    atomic_write(out / "sweep.md", lambda f: f.write(md))
    _sweep_plot(out / "sweep.png", table, ce, several)
    _written(out, text, " ".join(verdict), "sweep.{csv,png,md}")


def _sweep_plot(path: Path, table: list[dict[str, Any]], ce: dict | None, variants: bool) -> None:
    """Accuracy against T, a line per setting; with one T, a point per setting."""
    fig, ax = _axes()
    temperatures = sorted({r["temperature"] for r in table})
    over_t = len(temperatures) > 1
    series: dict[str, list[dict[str, Any]]] = {}
    for r in table:
        series.setdefault(_setting(r, variants, temperature=False), []).append(r)
    style = {"marker": "o", "capsize": 3, "linestyle": "-" if over_t else "none"}
    for i, (name, rows) in enumerate(series.items()):
        xs = [r["temperature"] for r in rows] if over_t else [i]
        line = ax.errorbar(xs, [r["val"] for r in rows], yerr=[r["val_sd"] for r in rows], **style,
                           label=f"{name}: val" if over_t else ("val" if i == 0 else None))  # fmt: skip
        ax.errorbar(xs, [r["test"] for r in rows], yerr=[r["test_sd"] for r in rows],
                    **{**style, "marker": "s", "linestyle": "--" if over_t else "none"},
                    color=line[0].get_color(), alpha=0.7,
                    label=f"{name}: test" if over_t else ("test" if i == 0 else None))  # fmt: skip
    if ce:
        ax.axhline(ce["val"], color="gray", label=f"CE only val ({ce['n']} seeds)")
        ax.axhline(ce["test"], color="gray", linestyle="--", label="CE only test")
        ax.axhspan(ce["test"] - ce["test_sd"], ce["test"] + ce["test_sd"], color="gray", alpha=0.15)
    if over_t:
        ax.set_xscale("log", base=2)
        ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
        ax.minorticks_off()
        xlabel, title = "temperature T", "Knowledge distillation: accuracy vs temperature"
    else:
        ax.set_xticks(range(len(series)), list(series), rotation=30, ha="right")
        xlabel = f"setting (T={temperatures[0]:g})" if temperatures else "setting"
        title = "Knowledge distillation: accuracy per setting"
    _finish(fig, ax, path, xlabel, "accuracy (mean ± std over seeds)", title)


# --------------------------------------------------------------------------- prune-distill
def phase_label(row: dict[str, Any]) -> str:
    """``round k`` for a pruning round, else the phase's name (``start``, ``initial``, ``final``, ...)."""
    return f"round {row['round']}" if row["phase"] == "round" else row["phase"]


def prune_distill_report(
    out: Path, rows: list[dict[str, Any]], best: dict[str, Any], target: dict[str, Any], onnx_diff: float | None,
    deployed: dict[str, Any] | None, where: str, batch_size: int,
) -> None:  # fmt: skip
    """``rounds.csv``, ``summary.md`` (the phases, the baselines, the verdict, the shipped files) and ``pareto.png``
    (accuracy against latency) in ``out``. Every row's ``latency_ms`` was timed side by side with the others."""
    pruned = [r for r in rows if r["phase"] not in ("baseline", "scratch")]
    scratch = [r for r in rows if r["phase"] == "scratch"]
    baselines = [r for r in rows if r["phase"] == "baseline"]
    write_csv(out / "rounds.csv", ROUND_COLUMNS, [*pruned, *scratch, *baselines])
    _pareto(out / "pareto.png", pruned, scratch, baselines, best, target, where)

    def acc(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.4f}"

    lines = [[r["student"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['latency_ms']:.3f}", acc(r["val_acc"]),
              acc(r["test_acc"]), r["epochs"]] for r in [*pruned, *scratch, *baselines]]  # fmt: skip
    header = ["student", "params", "MACs", f"latency (ms, {where})", "val acc", "test acc", "epochs"]
    text = markdown_table(header, "lrrrrrr", lines)
    if "fraction" in target:  # of the start's time: its ms in this timing, where the search timed it beside the start
        aim = (f"Best student for the target of {target['fraction']:g} of the start's time ({target['value']:.3f} ms "
               f"in this timing; met as the latency search measured it, beside the start)")  # fmt: skip
    elif target["unit"] == "ms":  # met as the search measured it; timed again beside the others, within noise
        aim = f"Best student for the {target['value']:.3f} ms target (met as the latency search measured it)"
    else:
        aim = f"Best student under {target['value']:,} {target['unit']}"
    verdict = (
        f"{aim}: {best['student']} ({best['params']:,} parameters, {best['latency_ms']:.3f} ms, test acc "
        f"{best['test_acc']:.4f}), saved as best_student.ckpt"
    )
    if onnx_diff is not None:
        verdict += f", best_student.onnx (ONNX Runtime matches PyTorch within {onnx_diff:.1e})"
    if deployed is not None:
        drop = 100 * (deployed["float_test_acc"] - deployed["int8_test_acc"])
        speed = deployed["float_latency_ms"] / deployed["int8_latency_ms"]
        verdict += (
            f" and best_student.int8.onnx ({deployed['float_bytes'] / deployed['int8_bytes']:.1f}x smaller, "
            f"{-drop:+.2f} points of test accuracy, {speed:.2f}x the float32 file's speed"
            f"{'' if speed > 1 else ': slower, ship float32 where speed matters'})"
        )
    verdict += "."
    if scratch:
        delta = 100 * (scratch[0]["test_acc"] - max(r["test_acc"] for r in pruned if r["round"] > 0))
        verdict += (
            f" The pruned layout retrained from scratch for the same {scratch[0]['epochs']} epochs reaches "
            f"{scratch[0]['test_acc']:.4f} ({delta:+.2f} points against the best pruned phase)."
        )
    if baselines:
        verdict += " " + against_baselines(best, baselines, target)
    shipped = ""
    if deployed is not None:
        shipped = "\n\n## The best student where it runs (ONNX Runtime, CPU)\n\n" + deployment_table(
            deployed, batch_size
        )
    md = (
        f"# Prune-then-distill\n\n{text}\n\n{verdict}{shipped}\n\n"
        "Accuracies: the best validation epoch of each phase; test is reported, never used to choose. Latency: "
        f"every student timed side by side in interleaved rounds ({where}), median.\n\n"
        f"Reproduce (resumes if the run directory exists), from `{Path.cwd()}`: `distill prune-distill --config "
        f"{out / 'prune_distill.yaml'}`.\n"
    )
    atomic_write(out / "summary.md", lambda f: f.write(md))
    _written(out, text, verdict + shipped, "{rounds.csv,pareto.png,summary.md}")


def against_baselines(
    best: dict[str, Any], baselines: list[dict[str, Any]], target: dict[str, Any] | None = None
) -> str:
    """Which wins, and by how much: the pruned student against the most accurate baseline that runs no slower
    (points of test accuracy), and against the fastest baseline at least as accurate (speed ratio). A baseline over
    a size ``target`` (``{"value", "unit"}``, unit ``parameters`` or ``MACs``) is said to be."""

    def size(b: dict[str, Any]) -> str:
        key = {"parameters": "params", "MACs": "macs"}.get((target or {}).get("unit", ""))
        over = key is not None and b.get(key, 0) > target["value"]
        return f"{b['params']:,} parameters" + (
            f", over the {target['value']:,} {target['unit']} target" if over else ""
        )

    no_slower = [b for b in baselines if b["latency_ms"] <= best["latency_ms"]]
    as_accurate = [b for b in baselines if b["test_acc"] >= best["test_acc"]]
    parts = []
    if no_slower:
        b = max(no_slower, key=lambda r: r["test_acc"])
        delta = 100 * (best["test_acc"] - b["test_acc"])
        parts.append(
            f"At equal or lower latency the best baseline is {b['student']} ({size(b)}, {b['latency_ms']:.3f} ms, "
            f"test {b['test_acc']:.4f}): prune-distill is {delta:+.2f} points ({'wins' if delta > 0 else 'loses'})."
        )
    else:
        parts.append(f"No baseline runs as fast as the pruned student ({best['latency_ms']:.3f} ms).")
    if as_accurate:
        b = min(as_accurate, key=lambda r: r["latency_ms"])
        speed = b["latency_ms"] / best["latency_ms"]
        parts.append(
            f"The fastest baseline at least as accurate, {b['student']} ({size(b)}, test {b['test_acc']:.4f}), runs "
            f"in {b['latency_ms']:.3f} ms: the pruned student is {speed:.2f}x {'faster' if speed > 1 else 'its speed'}."
        )
    else:
        parts.append("No baseline is as accurate as the pruned student.")
    return " ".join(parts)


def deployment_table(deployed: dict[str, Any], batch_size: int) -> str:
    """The float32 and int8 ONNX files of a student: size, accuracies and latency in ONNX Runtime."""
    lines = [
        [f"best_student{suffix}.onnx", f"{deployed[f'{kind}_bytes'] / 1024:,.0f}",
         f"{deployed[f'{kind}_val_acc']:.4f}", f"{deployed[f'{kind}_test_acc']:.4f}",
         f"{deployed[f'{kind}_latency_ms']:.3f}"]
        for kind, suffix in (("float", ""), ("int8", ".int8"))
    ]  # fmt: skip
    header = ["file", "KiB", "val acc", "test acc", f"latency (ms, batch {batch_size})"]
    return markdown_table(header, "lrrrr", lines)


def _pareto(
    path: Path, pruned: list[dict[str, Any]], scratch: list[dict[str, Any]], baselines: list[dict[str, Any]],
    best: dict[str, Any], target: dict[str, Any], where: str,
) -> None:  # fmt: skip
    """Test accuracy against latency: the prune-distill phases, the retrained layout, the baselines."""
    fig, ax = _axes()
    shown = [r for r in pruned if not math.isnan(r["test_acc"])]
    ax.plot([r["latency_ms"] for r in shown], [r["test_acc"] for r in shown], marker="o", label="prune-distill")
    for r in shown:
        ax.annotate(phase_label(r), (r["latency_ms"], r["test_acc"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)  # fmt: skip
    for r in scratch:
        ax.scatter([r["latency_ms"]], [r["test_acc"]], marker="D", s=50, color="tab:green",
                   label="its layout, from scratch")  # fmt: skip
    if baselines:
        family = sorted(baselines, key=lambda r: r["latency_ms"])
        ax.plot([r["latency_ms"] for r in family], [r["test_acc"] for r in family], marker="*", markersize=11,
                color="black", linestyle="--", label="baselines, KD from scratch")  # fmt: skip
        for r in family:
            ax.annotate(r["student"].split(",")[0], (r["latency_ms"], r["test_acc"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)  # fmt: skip
    ax.scatter([best["latency_ms"]], [best["test_acc"]], s=140, facecolors="none", edgecolors="red",
               label="best under target")  # fmt: skip
    if target["unit"] == "ms":
        ax.axvline(target["value"], color="gray", linestyle=":", label="target")
    _finish(fig, ax, path, f"latency (ms, {where})", "test accuracy", "Accuracy vs latency where the student runs")


# ------------------------------------------------------------------------------ quickstart
def quickstart_table(results: dict[str, dict[str, Any]], batch_size: int) -> str:
    """One row per model (teacher, student, pruned, its int8 file, thin): size, ONNX file, latency, accuracies."""
    lines = [
        [role, r["model_name"], f"{r['params']:,}", f"{r['onnx_kib']:,.0f}", f"{r['latency_ms']:.2f}",
         f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}", r["checkpoint"]]
        for role, r in results.items()
    ]  # fmt: skip
    header = ["role", "model", "params", "ONNX KiB", f"ms/batch of {batch_size}", "val acc", "test acc", "file"]
    return markdown_table(header, "llrrrrrl", lines)
