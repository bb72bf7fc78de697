"""The benchmark scripts still run (at a tiny size); their numbers live in benchmarks/RESULTS.md."""

from __future__ import annotations

import ast
import itertools
import math
import shutil
import subprocess
from pathlib import Path

import torch
from helpers import fmnist, run_script

from distill.profile import count_macs, count_params
from students import StudentNet
from students.checkpoint import read_checkpoint
from teachers import load_teacher

ROOT = Path(__file__).parents[1]


def markdown_rows(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the first Markdown table in ``out``, as lists of cell texts."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[first:])  # to the table's end
    lines = [line for line in table if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines)
    assert all(len(row) == len(header) for row in rows)
    return header, rows


def test_pruning_speed_prints_its_table():
    args = ["--criteria", "l1", "hrank", "--ratios", "0.5", "--round-to", "1", "--rounds", "1", "--repeats", "1"]
    out = run_script("benchmarks/pruning_speed.py", *args).stdout
    header, rows = markdown_rows(out)
    col = {name: header.index(name) for name in ("criterion", "pruned", "round_to", "channels", "params", "MACs")}
    assert [(row[col["criterion"]], row[col["pruned"]], row[col["round_to"]]) for row in rows] == [
        ("-", "0%", "1"), ("l1", "50%", "1"), ("hrank", "50%", "1")
    ]  # fmt: skip
    full, *pruned = rows
    widths = ast.literal_eval(full[col["channels"]])
    assert widths == StudentNet().channels
    for row in rows:  # each row's numbers are those of the StudentNet its channels describe
        model = StudentNet(channels=ast.literal_eval(row[col["channels"]]), num_classes=10, in_chans=1, num_pools=3)
        macs = count_macs(model, torch.zeros(1, 1, 28, 28))
        assert row[col["params"]] == f"{count_params(model):,}" and row[col["MACs"]] == f"{macs:,}"
        assert row[col["MACs"] + 1] == f"{macs / int(full[col['MACs']].replace(',', '')):.0%}"  # MACs %
        for ms in (header.index("batch 1 ms"), header.index("batch 64 ms")):  # the % beside it: of the unpruned
            percent = float(row[ms]) / float(full[ms]) * 100  # from the rounded times: within 1 point and 1%
            assert abs(percent - float(row[ms + 1].rstrip("%"))) <= 1 + percent / 100
    for row in pruned:  # half of each layer; the criteria differ in which channels, not how many (per-layer ranking)
        assert row[col["channels"]] == pruned[0][col["channels"]]
        assert all(abs(w - b / 2) <= 1 for w, b in zip(ast.literal_eval(row[col["channels"]]), widths, strict=True))


def test_timm_zoo_prints_its_table():
    out = run_script("benchmarks/timm_zoo.py", "--models", "test_convnext").stdout
    header, rows = markdown_rows(out)
    row = dict(zip(header, rows[0], strict=True))
    assert row["model"] == "test_convnext" and row["tp alone"] == "ok" and row["reload"] == "bit-exact"
    assert row["l1"].startswith("ok, ") and row["taylor"].startswith("ok, ") and row["onnx"].startswith("ok, ")
    assert row["train"].startswith("ok, loss") and rows[-1][3:9] == ["**1/1**"] * 6


def test_onnx_exporters_benchmark_prints_both_files_of_each_model():
    args = ["--models", "StudentNet 0.5", "--batch-size", "4", "--rounds", "1", "--repeats", "1"]
    header, rows = markdown_rows(run_script("benchmarks/onnx_exporters.py", *args).stdout)
    assert header == ["model", "exporter", "file KiB", "export s", "ms", "torchscript / dynamo"]
    assert [row[:2] for row in rows] == [
        ["StudentNet 0.5", "dynamo (shipped)"],
        ["StudentNet 0.5", "torchscript (timing)"],
    ]
    (*_, shipped_ms, blank), (*_, timing_ms, ratio) = rows
    assert blank == "" and math.isclose(
        float(timing_ms) / float(shipped_ms), float(ratio), abs_tol=0.01 + 0.01 * float(ratio)
    )
    params_kib = count_params(StudentNet(width_mult=0.5, in_chans=1, num_classes=10, num_pools=3)) * 4 / 1024
    assert all(params_kib <= float(row[2]) < 1.5 * params_kib for row in rows)  # float32 weights, and little else
    refused = run_script("benchmarks/onnx_exporters.py", "--models", "StudentNet 2.0", check=False)
    assert refused.returncode == 2 and "invalid choice: 'StudentNet 2.0'" in refused.stderr


def test_layout_benchmark_prints_its_table():
    args = ["--teacher", "test_resnet", "--batch-size", "16", "--batches", "1", "--repeats", "1"]
    header, rows = markdown_rows(run_script("benchmarks/layout.py", *args).stdout)
    assert header == ["step", "contiguous ms", "channels-last ms", "contiguous / channels-last"]
    names = ["teacher (test_resnet), labels", "StudentNet 1.0, labels", "KD: StudentNet 1.0 from test_resnet"]
    assert [row[0] for row in rows] == names
    for _, nchw, nhwc, ratio in rows:
        assert float(nhwc) > 0 and math.isclose(float(nchw) / float(nhwc), float(ratio), rel_tol=0.05)  # rounded ms
    refused = run_script("benchmarks/layout.py", "--teacher", "no_such_model", check=False)  # before any timing
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith("layout.py: error: 'no_such_model'")


def test_latency_search_benchmark_prints_each_search_and_refuses_bad_input(tmp_path: Path):
    args = ["--width", "0.75", "--fraction", "0.85", "--searches", "1", "--rounds", "8"]  # all eight layers searched
    # (width 0.5's smallest layout read 0.89 of it in a slow phase of a CI run, and the check refused 0.85)
    out = run_script("benchmarks/latency_search.py", *args, "--modes", "relative", "fixed").stdout
    target = float(out.split("target ")[1].split(" ms")[0])
    header, rows = markdown_rows(out)
    relative, fixed = (dict(zip(header, row, strict=True)) for row in rows)
    assert (relative["mode"], fixed["mode"]) == ("relative", "fixed")
    assert len(relative["ms at each timing"].split()) == int(relative["timings"])
    assert float(relative["search's ms"]) <= target and 0 < float(relative["re-timed / start"]) < 1
    path = fixed["ms at each timing"].split()  # the student's ms as timed: a noisy phase may meet the target unpruned,
    assert len(path) == int(fixed["timings"]) and fixed["search's ms"] in (path[-1], "failed")  # or fail the search
    summary = out.split("\n\n")[-1]
    assert summary.startswith("| mode | searches |") and "| relative | 1 |" in summary and "| fixed | 1 |" in summary
    channels = ast.literal_eval(relative["channels"])
    model = StudentNet(channels=channels, num_classes=10, in_chans=1, num_pools=3)
    assert relative["params"] == f"{count_params(model):,}" and all(c % 8 == 0 for c in channels)
    for args, message in ((["--fraction", "1.5"], "need 0 < --fraction < 1"), (["--rounds", "0"], "need 0 <"),
                          (["--checkpoint", str(tmp_path / "none.ckpt")], "Checkpoint")):  # fmt: skip
        refused = run_script("benchmarks/latency_search.py", *args, check=False)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].startswith(f"latency_search.py: error: {message}")


def test_gpu_numbers_refuses_an_unknown_stage_before_running_anything(tmp_path: Path):
    """The GPU script checks every stage first: a typo after a long stage would otherwise waste the lease."""
    script = tmp_path / "benchmarks" / "gpu_numbers.sh"
    script.parent.mkdir()
    script.write_text((ROOT / "benchmarks" / "gpu_numbers.sh").read_text())
    for stages, message in ((["teacher", "lever"], "unknown stage 'lever': choose from speed teacher"), ([], "usage")):
        env = {"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}
        done = subprocess.run(["bash", str(script), *stages], capture_output=True, text=True, env=env)
        assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1
        assert [p.name for p in tmp_path.iterdir()] == ["benchmarks"]  # no runs/, no logs, nothing trained


def carry(*args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/carry.py ARGS``, in this process."""
    return run_script("benchmarks/carry.py", *args, check=False)


def test_carry_brings_a_teacher_to_the_next_gpu_call_in_parts_and_refuses_an_incomplete_set(
    teacher_checkpoint: Path, tmp_path: Path
):
    """gpu_numbers.sh packs the trained teacher into $OUT (8 files of 16 MiB come back), the next call unpacks it."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "teacher").mkdir(parents=True)
    (runs / "teacher" / "best.ckpt").write_bytes(teacher_checkpoint.read_bytes())
    refused = carry("--runs", str(runs), "pack", str(out), "teacher")
    assert refused.returncode != 0 and refused.stderr.strip().endswith("is missing): train it first")
    assert not out.exists()  # a killed run's checkpoint is not carried as done

    (runs / "teacher" / "finished").touch()
    part_mib = teacher_checkpoint.stat().st_size / 2**20 / 10  # packed: a third of the weights, half of their bytes
    done = carry("--runs", str(runs), "pack", str(out), "teacher", "--half", "--part-mib", str(part_mib))
    assert done.returncode == 0, done.stderr
    parts = sorted(p.name for p in out.iterdir())
    n, digest = len(parts), parts[0].split(".")[2]  # teacher.ckpt.<8 hex digits of the packed file's sha256>.1-of-n
    assert n >= 2 and parts == [f"teacher.ckpt.{digest}.{i}-of-{n}" for i in range(1, n + 1)]
    assert all((out / p).stat().st_size <= part_mib * 2**20 for p in parts)
    other = tmp_path / "other"  # another packing of the same teacher (in float32): parts of another file
    carry("--runs", str(runs), "pack", str(other), "teacher", "--part-mib", str(part_mib))

    for broken, message in (
        ("missing", "not those of one packing"),
        ("mixed", "not those of one packing"),
        ("truncated", "do not join into the file packed"),
    ):
        folder = tmp_path / broken
        shutil.copytree(out, folder)
        last = folder / parts[-1]
        if broken == "missing":
            last.unlink()
        elif broken == "mixed":
            shutil.copy(sorted(other.iterdir())[-1], folder)
        else:
            last.write_bytes(last.read_bytes()[:-100])
        failed = carry("--runs", str(tmp_path / "next"), "unpack", str(folder))
        assert failed.returncode == 1 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
        assert not (tmp_path / "next").exists()  # nothing written

    done = carry("--runs", str(tmp_path / "next"), "unpack", str(out))
    assert done.returncode == 0 and "unpacked teacher" in done.stdout, done.stderr
    carried = tmp_path / "next" / "teacher" / "best.ckpt"
    assert (tmp_path / "next" / "teacher" / "finished").is_file()
    before, after = read_checkpoint(teacher_checkpoint), read_checkpoint(carried)
    assert "optimizer_states" in before and set(after) == set(before) - {"optimizer_states", "lr_schedulers"}
    assert after["epoch"] == before["epoch"] and after["hyper_parameters"] == before["hyper_parameters"]
    assert {k for k, v in after["state_dict"].items() if v.dtype == torch.float16} == {
        k for k, v in before["state_dict"].items() if v.is_floating_point() and v.dim() >= 2
    }  # convolutions and the classifier halved; BatchNorm and biases kept in float32

    data = fmnist(batch_size=256)
    data.setup("test")
    x = next(iter(data.test_dataloader()))[0]
    with torch.no_grad():
        full, half = load_teacher(checkpoint=teacher_checkpoint)(x), load_teacher(checkpoint=carried)(x)
    assert (full - half).abs().max() < 1e-2 * full.abs().max()
    assert (full.argmax(1) == half.argmax(1)).float().mean() >= 0.99
    assert carry("--runs", str(tmp_path / "next"), "unpack", str(out)).stdout.startswith("unpacked nothing")
