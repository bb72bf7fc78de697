"""Pruning to a latency target measured on the runtime (issue 15): the search, the rounding, prune-distill."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from helpers import tiny_kd_recipe

from distill.export import export_onnx
from distill.latency import REFERENCE, LatencyMeter, relative_to
from distill.prune_distill import has_timed_start, latency_goals, prune_distill
from distill.pruning import CHANNEL_MULTIPLE, PruningPolicy, check_latency_target, prune_student
from students import StudentNet, load_student, save_student

X1 = torch.zeros(1, 1, 28, 28)
POLICY = PruningPolicy("l1", min_fraction=0.1, round_to=CHANNEL_MULTIPLE)
#: Layers the slower searches leave alone: 4 models a timing instead of 9 (the latency-search benchmark's test
#: prunes all eight).
OUTER = ["cnn.0.0", "cnn.1.3", "cnn.2.3", "cnn.3.3", "cnn.7.3"]


def net(**kwargs) -> StudentNet:
    return StudentNet(num_classes=10, in_chans=1, num_pools=3, **kwargs).eval()


def meter(rounds: int = LatencyMeter.rounds) -> LatencyMeter:
    """ONNX Runtime, batch 64, this machine's threads; 5 rounds where a test checks what is done with a timing,
    the default 15 where it compares models."""
    return LatencyMeter((1, 28, 28), rounds=rounds)


def test_a_model_times_the_same_alone_and_beside_another_and_onnx_runtime_still_works_after(tmp_path: Path):
    """ORT sessions with threads of their own slowed each other 1.5x; the timer's shared pool lives in a child
    process, so that the sessions of this process (export checks, quantization) keep their own threads."""
    ratios = []  # three alternations: on this shared VM whole calls ran 1.3x slow, two of three in one suite run
    for _ in range(3):
        alone = meter()({"a": net()})["a"]
        ratios.append(meter()({"a": net(), "b": net(width_mult=0.5)})["a"] / alone)
    assert min(ratios) < 1.2 and max(ratios) > 0.8, ratios  # the old timer read 1.5x every time
    path = tmp_path / "a.onnx"
    export_onnx(net(), X1, path)  # creates an ORT session with default options: refused in a pool's process
    assert ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": X1.numpy()})


def test_a_latency_target_is_met_as_measured_and_the_student_runs_faster():
    """Timed as prune-distill times it: beside the start, so that a slow phase of this shared machine (minutes of
    every model 1.3x or more slow) neither makes the target out of reach nor the pruned student look slower."""
    torch.manual_seed(0)
    model = net()
    start = copy.deepcopy(model)
    before = meter(5)({"start": start})["start"]  # the unit only: each timing is scaled by the start's beside it
    middle = PruningPolicy("l1", min_fraction=0.1, ignored_layers=OUTER)
    timed = relative_to(meter(5), start, before)
    report = prune_student(model, X1, middle, target_latency_ms=0.75 * before, latency=timed)
    assert report.latency_ms is not None and report.latency_ms <= 0.75 * before  # as the search measured it
    assert report.params_after < report.params_before
    assert all(c % CHANNEL_MULTIPLE == 0 for c in model.channels) and model.channels[:4] == start.channels[:4]
    ms = meter()({"start": start, "pruned": model})  # timed again, side by side; a generous margin
    assert ms["pruned"] < 0.95 * ms["start"], ms
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_search_prunes_only_what_makes_the_student_faster():
    """With a runtime where only layer 5's width costs time, only layer 5 loses channels, to a multiple of 8."""
    model = net()

    def layer5_costs(models: dict) -> dict[str, float]:  # "milliseconds": the width of layer 5
        return {name: float(m.channels[5]) for name, m in models.items()}

    report = prune_student(model, X1, POLICY, target_latency_ms=100, latency=layer5_costs)
    assert model.channels == [16, 32, 64, 128, 256, 96, 256, 256] and report.latency_ms == 96


def middle_widths(model: StudentNet) -> float:
    """A runtime's "milliseconds" in which only layers 4 to 6 cost time, in proportion to their widths."""
    return sum(model.channels[4:7]) / 100


@pytest.mark.parametrize(("busy_call", "slow", "fraction"), [(1, 1.2, 0.85), (2, 1.5, 0.75)])
def test_a_busy_timing_does_not_make_the_search_overshoot(busy_call: int, slow: float, fraction: float):
    """One call reads every model slow. The first, 1.2x: aimed at that whole gap, a step cut the student to 0.83 of
    its target (in "ms" that are the widths of layers 4 to 6); aimed at half of it, the search lands within 5%.
    The second, 1.5x: with the gap from that reading instead of the least so far, half of it overshot to 0.92."""
    calls = []

    def busy(models: dict) -> dict[str, float]:
        calls.append(len(models))
        return {name: middle_widths(m) * (slow if len(calls) == busy_call else 1.0) for name, m in models.items()}

    model, target = net(), fraction * 7.68
    report = prune_student(model, X1, POLICY, target_latency_ms=target, latency=busy)
    assert 0.95 * target <= report.latency_ms == middle_widths(model) <= target, (model.channels, report)
    assert len(calls) <= 8


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_a_fraction_of_the_start_holds_through_a_slow_or_fast_phase(speed: float):
    """From the check on, every model reads ``speed`` times its "ms" (a phase of a shared machine lasts minutes).
    Timed beside the start's layout, the search still lands within 5% of 0.75 of the start; compared with the
    check's milliseconds, a fast phase met the target unpruned and a slow one cut to about 0.4 of the start."""

    def phase(models: dict) -> dict[str, float]:
        return {name: middle_widths(m) * speed for name, m in models.items()}

    start, target = net(), 0.75 * 7.68  # the check timed the start at 7.68 "ms", before the phase
    model = net()
    report = prune_student(model, X1, POLICY, target_latency_ms=target, latency=relative_to(phase, start, 7.68))
    assert report.latency_ms == pytest.approx(middle_widths(model))  # in the start's units, the phase divided out
    assert 0.95 * target <= middle_widths(model) <= target, model.channels
    plain = net()
    if speed < 1:
        prune_student(plain, X1, POLICY, target_latency_ms=target, latency=phase)
        assert middle_widths(plain) == 7.68
    with pytest.raises(ValueError, match="names the reference model"):
        relative_to(phase, start, 7.68)({REFERENCE: plain})


def test_a_long_slow_phase_ends_past_the_target_instead_of_failing():
    """The first timing is quiet and 0.04 above the target; from the second on every model reads 1 "ms" slow. The
    gap from the least reading is one chunk a step, never enough: the last two steps aim at the whole gap."""
    calls = []

    def slow_after_first(models: dict) -> dict[str, float]:
        calls.append(len(models))
        return {name: middle_widths(m) + (1.0 if len(calls) > 1 else 0.0) for name, m in models.items()}

    model = net(channels=[16, 32, 64, 128, 200, 192, 192, 256])  # 5.84 "ms"
    report = prune_student(model, X1, POLICY, target_latency_ms=5.8, latency=slow_after_first)
    assert 10 <= len(calls) <= 12 and report.latency_ms <= 5.8 and middle_widths(model) < 5.0, model.channels


def test_the_last_cuts_aim_past_the_target_so_a_reading_a_little_over_it_does_not_fail_the_search():
    """As in the test above, and from the eleventh timing on every reading 2% slower than the one before (seen: a
    search gave up at 1.387 ms for 1.372). Aimed at the target itself, both last cuts read just over it."""
    calls = []

    def creeping(models: dict) -> dict[str, float]:
        calls.append(len(models))
        drift = 1 + 0.02 * max(0, len(calls) - 10)
        return {name: (middle_widths(m) + (1.0 if len(calls) > 1 else 0.0)) * drift for name, m in models.items()}

    model = net(channels=[16, 32, 64, 128, 200, 192, 192, 256])  # 5.84 "ms"
    report = prune_student(model, X1, POLICY, target_latency_ms=5.8, latency=creeping)
    assert len(calls) <= 12 and report.latency_ms <= 5.8, model.channels


def test_a_step_cuts_a_layer_no_further_than_its_probe_measured():
    """The first call reads every probe slower but one, barely faster (noise): that layer's tiny saving per
    channel sent it from 256 channels to its floor of 32 in one step (to 5.44 "ms" for a 5.76 target); now it
    loses at most the quarter its probe cut, and the steps after, timed quietly, see what the cut saved."""
    calls = []

    def noisy_first(models: dict) -> dict[str, float]:
        calls.append(len(models))
        timed = {name: middle_widths(m) for name, m in models.items()}
        if len(calls) == 1:  # the probes of layers 4 and 5 read slower; layer 6's barely faster
            timed = {name: ms + (1.0 if name != "current" else 0) for name, ms in timed.items()}
            timed["cnn.6.3"] = timed["current"] - 0.01
        return timed

    model = net()
    prune_student(model, X1, POLICY, target_latency_ms=5.76, latency=noisy_first)
    assert model.channels[6] >= 128 and 0.95 * 5.76 <= middle_widths(model) <= 5.76, model.channels


def test_kept_channel_counts_are_rounded_up_floors_included():
    model = net()
    prune_student(model, X1, POLICY, ratio=0.97)  # floors 2, 4, 7, 13, 26 (min_fraction 0.1) rounded up to 8
    assert model.channels == [8, 8, 8, 16, 32, 32, 32, 32]


def test_a_student_pruned_to_a_size_with_the_default_rounding_runs_faster_than_with_uneven_counts():
    """Global ranking leaves uneven channel counts; rounded to CHANNEL_MULTIPLE they run fast in ONNX Runtime.

    (Against the unpruned start, 1.2 against 1.8 ms on a quiet 2-core CPU, the order flipped once in CI beside
    another load: that claim lives in RESULTS.md; uneven counts ran 2.5x slower than rounded ones.)"""
    models = {}
    for round_to in (1, CHANNEL_MULTIPLE):
        torch.manual_seed(0)
        models[round_to] = net()
        policy = PruningPolicy("l1", global_ranking=True, min_fraction=0.1, round_to=round_to)
        prune_student(models[round_to], X1, policy, target_params=100_000)
    assert any(c % 4 for c in models[1].channels) and all(c % CHANNEL_MULTIPLE == 0 for c in models[8].channels)
    ms = meter()({"uneven": models[1], "rounded": models[CHANNEL_MULTIPLE]})
    assert ms["rounded"] < ms["uneven"], ms


def test_unreachable_latency_targets_are_refused_with_what_was_measured():
    with pytest.raises(ValueError, match=r"cannot be met: with every prunable layer at its floor .* ms \(onnx"):
        check_latency_target(net(), X1, POLICY, 1e-6, meter(5))
    with pytest.raises(ValueError, match=r"is not below the student's .* ms .*: nothing to prune"):
        check_latency_target(net(), X1, POLICY, 1e6, meter(5))
    with pytest.raises(ValueError, match="needs a positive, finite target_latency_ms and latency="):
        prune_student(net(), X1, POLICY, target_latency_ms=1.0)
    with pytest.raises(ValueError, match="give target_latency_ms or fraction"):
        check_latency_target(net(), X1, POLICY, None, meter(5))
    start, smallest = check_latency_target(net(), X1, POLICY, None, meter(5), fraction=0.9)  # of the same timing
    assert smallest < 0.9 * start


def test_a_fraction_target_comes_from_the_quietest_of_three_timings():
    """A busy moment only adds time: a fraction of one slow reading of the student could be its own time."""
    readings = iter([{"student": 4.0, "smallest": 1.5}, {"student": 3.0, "smallest": 1.0}, {"student": 3.2,
                     "smallest": 1.1}])  # fmt: skip
    calls = []

    def busy_then_quiet(models: dict) -> dict[str, float]:
        calls.append(sorted(models))
        return next(readings)

    start, smallest = check_latency_target(net(), X1, POLICY, None, busy_then_quiet, fraction=0.75)
    assert (start, smallest) == (3.0, 1.0) and calls == [["smallest", "student"]] * 3
    readings = iter([{"student": 3.0, "smallest": 1.0}])  # a target in milliseconds: timed once
    assert check_latency_target(net(), X1, POLICY, 2.0, busy_then_quiet) == (3.0, 1.0) and len(calls) == 4


def test_a_run_that_trained_nothing_times_its_start_again(tmp_path: Path):
    """A run killed before its first phase ended starts afresh with new settings: its timing is not reused."""
    state = {"settings": {}, "phases": {"start": {}}, "start_latency_ms": 1.0}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert not has_timed_start(tmp_path)
    state["phases"]["initial"] = {"checkpoint": "initial/best.ckpt"}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert has_timed_start(tmp_path)


def test_latency_goals_step_geometrically_and_end_at_the_target():
    assert latency_goals("geometric", 2, 0.05, 4.0, 1.0) == [2.0, 1.0]
    assert latency_goals("fixed", 5, 0.5, 4.0, 1.5) == [2.0, 1.5]


def test_a_layout_retrained_from_scratch_has_the_layout_and_fresh_weights(tmp_path: Path):
    model = net()
    prune_student(model, X1, POLICY, ratio=0.5)
    path = save_student(model, tmp_path / "pruned.ckpt")
    torch.manual_seed(3)
    fresh = load_student(path, from_scratch=True)
    torch.manual_seed(3)
    expected = StudentNet(num_classes=10, in_chans=1, num_pools=3, channels=model.channels)
    assert fresh.channels == model.channels
    pairs = zip(fresh.state_dict().values(), expected.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(fresh.fc[0].weight, model.fc[0].weight)


@pytest.mark.slow
def test_prune_distill_to_a_latency_target_with_bracketing_widths_resumes_and_refuses_other_targets(
    tmp_path: Path, small_teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
):
    timed, timing_rounds = [], set()  # the names of each timing's models (the timings themselves are real), its rounds
    real = LatencyMeter.__call__
    monkeypatch.setattr(
        LatencyMeter,
        "__call__",
        lambda self, models: timed.append(set(models)) or timing_rounds.add(self.rounds) or real(self, models),
    )
    settings = {
        "recipe": str(tiny_kd_recipe(tmp_path, small_teacher_checkpoint)),
        "overrides": {"model": {"student": {"init_args": {"base": 16, "width_mult": 1.0}}}},  # the seed's 256k
        "target_latency": 0.8,  # of the start's time in the check's timing; the smallest layout runs in about 0.34
        "ignored_layers": OUTER,
        "initial_epochs": 1,
        "epochs_per_round": 1,
        "rounds": 2,
        "final_epochs": 0,
        "retrain_from_scratch": True,
        "baseline": False,  # the widths bracketing the pruned student: test_quickstart_end_to_end
        "export_onnx": False,
        "latency_rounds": 5,  # of the default 15: a test checks what the run does with its timings, not their spread
        "run_dir": str(tmp_path / "run"),
    }
    rows = prune_distill(**settings)
    assert timing_rounds == {5}
    run = Path(settings["run_dir"])
    state = json.loads((run / "state.json").read_text())
    target_ms = state["target_latency_ms"]
    assert target_ms == round(0.8 * state["start_latency_ms"], 3)
    rounds = [r for r in rows if r["phase"] == "round"]  # one, where the first search landed under the target
    searched = [state["pruned"][str(r["round"])]["searched_ms"] for r in rounds]
    assert searched[-1] <= target_ms < min(searched[:-1], default=math.inf)  # met, as measured: by the last round
    assert [r["phase"] for r in rows if r["phase"] in ("round", "scratch")] == ["round"] * len(rounds) + ["scratch"]
    last = load_student(rounds[-1]["checkpoint"])
    scratch = next(r for r in rows if r["phase"] == "scratch")
    assert load_student(scratch["checkpoint"]).channels == last.channels
    assert scratch["epochs"] == 1 + len(rounds)  # the initial epoch and one a round: 2 ran where round 1 met the target
    assert all(c % CHANNEL_MULTIPLE == 0 for c in last.channels)
    summary = (run / "summary.md").read_text()
    searched = [names for names in timed if "current" in names]  # the search's timings: each beside the start
    assert searched and all(REFERENCE in names for names in searched)
    assert "Best student for the target of 0.8 of the start's time" in summary
    assert "retrained from scratch" in summary
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    assert prune_distill(**settings) == rows  # finished: everything is reused, nothing measured again
    with pytest.raises(ValueError, match=r"other settings \(target_latency changed\)"):
        prune_distill(**{**settings, "target_latency": 0.7})

    # Killed while its last round trained: the round resumes from the layout its search chose, not from a new search.
    k = len(rounds)
    del state["phases"][f"round{k}"]
    (run / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run / f"round{k}")
    resumed = prune_distill(**settings)
    again = json.loads((run / "state.json").read_text())
    assert again["pruned"][str(k)] == state["pruned"][str(k)]  # not searched again
    assert again["target_latency_ms"] == target_ms  # not re-timed
    resumed_last = next(r for r in resumed if r["phase"] == "round" and r["round"] == k)
    assert load_student(resumed_last["checkpoint"]).channels == last.channels

    # Killed after round 1, whose search landed at or under the target itself: no round 2 prunes nothing and trains.
    state = {**again, "pruned": {"1": {**again["pruned"]["1"], "searched_ms": target_ms}}}
    state["phases"] = {key: row for key, row in state["phases"].items() if key in ("initial", "round1")}
    (run / "state.json").write_text(json.dumps(state))
    ended = prune_distill(**settings)
    trained = [(r["phase"], r["round"]) for r in ended if r["phase"] in ("round", "scratch")]
    assert trained == [("round", 1), ("scratch", 3)]
    assert load_student(ended[-1]["checkpoint"]).channels == load_student(rounds[0]["checkpoint"]).channels


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": 28}, r"input_shape must be \[channels, height, width\] of whole numbers > 0 \(.*\), got 28"),
        ({"input_shape": (1, 28.9, 28)}, r"got \(1, 28.9, 28\)"),  # was: 28, silently
        (
            {"batch_size": 2.5},
            r"must be whole numbers, got \{'batch_size': 2.5",
        ),  # was: a TypeError at the first timing
        ({"threads": 0}, r"need rounds, repeats \(and threads, if given\) >= 1"),  # was: accepted until then
    ],
)
def test_a_latency_meter_refuses_what_it_cannot_time_with_when_it_is_made(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        LatencyMeter(**{"input_shape": (1, 28, 28), **kwargs})
