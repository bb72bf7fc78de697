"""int8 and torch.export files of a student, and latency on each runtime (distill export, distill.quantize)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import fmnist, tiny_kd_recipe, tiny_trainer

from distill import DistillModule, FashionMNISTDataModule
from distill.cli import main
from distill.export import export, export_onnx, export_pt2, export_torchscript, int8_line
from distill.latency import compare_latency, measure_latency
from distill.profile import activation_floor
from distill.quantize import QuantOptions, calibration_images, quantize_checked, quantize_onnx
from students import StudentNet, create_student, load_student, save_student

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small StudentNet (base 4) trained for 100 batches (about 70% on Fashion-MNIST): int8 has something to lose."""
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    model = DistillModule(create_student("test_studentnet", base=4, num_classes=10, in_chans=1, num_pools=3), lr=0.01)
    tiny_trainer(out, limit_train_batches=100, limit_val_batches=0).fit(model, datamodule=fmnist(batch_size=64))
    path = out / "student.ckpt"
    model.trainer.save_checkpoint(path)
    return path


def test_int8_export_keeps_accuracy_and_shrinks_the_file(tmp_path: Path, trained: Path):
    recipe = tiny_kd_recipe(tmp_path, trained)  # its data: 500 validation images, no augmentation
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = export(str(trained), onnx=str(tmp_path / "s.onnx"), int8=str(tmp_path / "s.int8.onnx"),
                        recipe=str(recipe), calibration_images=256)  # fmt: skip
    int8 = result["int8"]
    assert int8["float_val_acc"] > 0.6  # a trained model: the comparison means something
    assert abs(int8["float_val_acc"] - int8["int8_val_acc"]) <= 0.03  # 500 images: 15 of them
    assert (
        int8["int8_bytes"] == (tmp_path / "s.int8.onnx").stat().st_size < 0.7 * int8["float_bytes"]
    )  # graph overhead: a tiny net is not 4x smaller
    assert "int8: " in out.getvalue() and "validation accuracy in ONNX Runtime" in out.getvalue()

    session = ort.InferenceSession(str(tmp_path / "s.int8.onnx"), providers=["CPUExecutionProvider"])
    shipped = {
        "input_size": [1, 28, 28],
        "crop_pct": 1.0,  # the whole image
        "interpolation": "bilinear",
        "mean": [0.286],
        "std": [0.353],
        "label_names": list(FashionMNISTDataModule.classes),
    }
    for path in ("s.onnx", "s.int8.onnx"):  # what the files need to be fed and read, for whoever deploys them
        said = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"]).get_modelmeta()
        assert {key: json.loads(said.custom_metadata_map[key]) for key in shipped} == shipped, path
    assert any(
        node.op_type == "QuantizeLinear" for node in __import__("onnx").load(tmp_path / "s.int8.onnx").graph.node
    )
    x = next(iter(_setup(fmnist(val_size=500)).val_dataloader())).x[:16]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = load_student(trained)(x).detach().numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.85  # int8 logits: close, not equal
    assert np.abs(got - expected).max() < 0.25 * np.abs(expected).max()


def _setup(datamodule):
    datamodule.setup("fit")
    return datamodule


class _Watched(FashionMNISTDataModule):
    """Fashion-MNIST that records which splits' loaders were asked for."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.asked: list[str] = []

    def train_dataloader(self):
        self.asked.append("train")
        return super().train_dataloader()

    def val_dataloader(self):
        self.asked.append("val")
        return super().val_dataloader()

    def test_dataloader(self):
        self.asked.append("test")
        return super().test_dataloader()


def test_calibration_reads_only_the_training_split_and_leaves_the_random_state(tmp_path: Path):
    data = _Watched(batch_size=32, val_size=500)
    state = torch.get_rng_state()
    images = calibration_images(data, 70)
    assert data.asked == ["train"] and [len(x) for x in images] == [32, 32, 6]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(images, calibration_images(data, 70), strict=True))  # seeded

    model = StudentNet(base=2, num_classes=10, in_chans=1, num_pools=3)
    export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    data.asked.clear()
    quantize_checked(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", data, splits=("val",), limit_batches={"val": 2})
    assert data.asked == ["train", "val"]  # calibration, then float32 and int8 on validation; never test


def test_a_model_onnx_runtime_cannot_quantize_gets_one_line_and_no_file(tmp_path: Path):
    (tmp_path / "bad.onnx").write_text("not a model\n")
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot quantize .*bad.onnx") as err:
        quantize_onnx(tmp_path / "bad.onnx", tmp_path / "bad.int8.onnx", [torch.zeros(1, 1, 28, 28)])
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    student = StudentNet(base=2, num_pools=2, in_chans=1).eval()
    export_onnx(student, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    for shape, given in (((4, 1, 32, 32), "4x1x32x32"), ((4, 3, 28, 28), "4x3x28x28"), ((28, 28), "28x28")):
        words = rf"^calibration batches are {given}, but .*m.onnx takes Nx1x28x28 inputs: give images of its input"
        with pytest.raises(ValueError, match=words + r" size \(the data it was trained on\)$"):
            quantize_onnx(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [torch.zeros(shape)])
    fixed = tmp_path / "fixed.onnx"  # a batch of 4, as another tool may export it; the last calibration batch: 2
    torch.onnx.export(student, (torch.zeros(4, 1, 28, 28),), str(fixed), input_names=["images"], dynamo=False)
    words = r"^calibration batches are 2x1x28x28, but .*fixed.onnx takes 4x1x28x28 inputs: give batches of 4 images"
    with pytest.raises(
        ValueError, match=words + r" \(or export it with a dynamic batch size, as distill export does\)$"
    ):
        quantize_onnx(fixed, tmp_path / "m.int8.onnx", [torch.zeros(4, 1, 28, 28), torch.zeros(2, 1, 28, 28)])
    with pytest.raises(ValueError, match=r"a calibration batch holds no images \(its shape is \(0, 1, 28, 28\)\)"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [torch.zeros(0, 1, 28, 28)])  # was: a model
        # of the same logits for every input
    with pytest.raises(ValueError, match=r"The int8 file would replace the float32 one \(.*m.onnx\): give it a name"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "m.onnx", [torch.zeros(4, 1, 28, 28)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "fixed.onnx", "m.onnx"]


def test_the_activation_floor_is_one_layers_input_and_output_found_without_allocating():
    float32 = 4
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.Flatten())
    assert activation_floor(net, (3, 1, 28, 28)) == 3 * (1 + 4) * 28 * 28 * float32  # the conv's; ReLU and Flatten
    assert activation_floor(net, (3, 1, 28, 28)) == activation_floor(net.to(torch.float64), (3, 1, 28, 28)) / 2
    student = StudentNet(in_chans=1)
    norm = student.cnn[0][1]  # its first BatchNorm: 16 channels in and out at full resolution, 894 GiB at 50k
    floor = activation_floor(student, (3, 1, 50_000, 50_000))
    assert norm.num_features == 16 and floor == 3 * (16 + 16) * 50_000**2 * float32
    assert all(p.device.type == "cpu" for p in student.parameters())  # its weights stay where they were

    class Counts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * int(x.sum().item() > 0)  # a number read from the data: not known on the meta device

    assert activation_floor(Counts(), (1, 3)) is None


def test_int8_without_its_extra_names_the_install(tmp_path: Path, small_teacher_checkpoint: Path):
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # as if the onnx extra were not installed
        "from distill.cli import main\n"
        f"main(['export', {str(small_teacher_checkpoint)!r}, '--int8', {str(tmp_path / 's.int8.onnx')!r}, "
        f"'--recipe', {str(ROOT / 'configs/fmnist/kd.yaml')!r}])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(lines) == 1 and 'pip install "distill[onnx]"' in lines[0] and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_pt2_export_reloads_with_a_dynamic_batch(tmp_path: Path, small_teacher_checkpoint: Path):
    with contextlib.redirect_stdout(io.StringIO()):
        result = export(str(small_teacher_checkpoint), pt2=str(tmp_path / "s.pt2"))
    assert result["pt2"] < 1e-4
    program = torch.export.load(str(tmp_path / "s.pt2")).module()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(program(x), load_student(small_teacher_checkpoint).eval()(x), atol=1e-4, rtol=0)


def test_export_refuses_int8_without_data_before_writing(tmp_path: Path, small_teacher_checkpoint: Path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        main(["export", str(small_teacher_checkpoint), "--int8", str(tmp_path / "out" / "s.int8.onnx")])
    assert stopped.value.code == 2 and "no config.yaml beside" in err.getvalue() and "--recipe" in err.getvalue()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("runtime", ["torch-cpu", "onnxruntime", "onnxruntime-int8"])
def test_latency_is_measured_on_each_runtime(runtime: str):
    small, large = (StudentNet(width_mult=w, num_classes=10, in_chans=1, num_pools=3) for w in (0.25, 2.0))
    shape = np.array([1, 28, 28])  # numpy's ints (a shape read off an array) failed in the JSON to ONNX Runtime's timer
    ms = compare_latency(
        {"small": small, "large": large}, shape, runtime, batch_size=32, threads=1, rounds=3, repeats=3
    )
    assert set(ms) == {"small", "large"} and all(t > 0 for t in ms.values())
    assert ms["small"] < ms["large"]  # 12x fewer MACs (640k, 7.7M): faster on every runtime


def test_latency_refuses_what_it_cannot_measure(tmp_path: Path):
    model = StudentNet(base=2, num_classes=10, in_chans=1, num_pools=3)
    with pytest.raises(ValueError, match="Unknown latency runtime 'tpu'"):
        measure_latency(model, (1, 28, 28), runtime="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency(model, (1, 28, 28), batch_size=0)
    with pytest.raises(ValueError, match="measures a PyTorch module"):
        measure_latency(tmp_path / "m.onnx", (1, 28, 28), runtime="torch-cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            measure_latency(model, (1, 28, 28), runtime="torch-cuda")


def test_a_failed_export_leaves_the_earlier_files_as_they_were(
    tmp_path: Path, small_teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
):
    import distill.export

    recipe = tiny_kd_recipe(tmp_path, small_teacher_checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.onnx").write_text("an earlier export\n")
    # Exported for 32x32 inputs, calibrated on the recipe's 28x28 images: the ONNX file passes, quantization fails
    # (past the check that refuses them first, as data it cannot read the shape of would), naming the file asked for.
    with pytest.raises(ValueError, match=r"would be 1x28x28 .* exported for 1x32x32 inputs"):
        export(str(small_teacher_checkpoint), int8=str(out / "s.int8.onnx"), recipe=str(recipe), input_size=32)
    monkeypatch.setattr(distill.export, "_check_calibration_shape", lambda *_, **__: None)
    with pytest.raises(ValueError, match=rf"calibration batches are 32x1x28x28, but {re.escape(str(out / 's.onnx'))} "):
        export(str(small_teacher_checkpoint), onnx=str(out / "s.onnx"), int8=str(out / "s.int8.onnx"),
               recipe=str(recipe), input_size=32)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["s.onnx"]  # nothing staged is left
    assert (out / "s.onnx").read_text() == "an earlier export\n"  # the new ONNX file passed, yet was not moved in
    int8_only = re.escape(f"but the float32 ONNX export of {small_teacher_checkpoint} takes Nx1x32x32 inputs")
    with pytest.raises(ValueError, match=int8_only):
        export(str(small_teacher_checkpoint), int8=str(out / "s.int8.onnx"), recipe=str(recipe), input_size=32)
    assert sorted(p.name for p in out.iterdir()) == ["s.onnx"]  # int8 alone: its float32 file was a temporary one


def test_a_sigterm_outside_a_trainer_run_stops_with_the_resume_line_and_leaves_the_earlier_files(
    tmp_path: Path, small_teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
):
    """``kill``, ``timeout`` or a scheduler stopping a command between Trainer runs (here while it quantizes; in a
    job, while it prunes, times or exports) ends it as Lightning ends a Trainer run: status 143 and how to resume."""
    import distill.export

    out = tmp_path / "out"
    out.mkdir()
    (out / "s.onnx").write_text("an earlier export\n")

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return quantize_checked(*args, **kwargs)

    def default_action(*_):  # without the command's own handler the test process would be killed
        raise AssertionError("the SIGTERM reached the default action, which ends a process without a word")

    monkeypatch.setattr(distill.export, "quantize_checked", stopped)
    recipe = tiny_kd_recipe(tmp_path, small_teacher_checkpoint)
    before = signal.signal(signal.SIGTERM, default_action)
    try:
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
            main(["export", str(small_teacher_checkpoint), "--onnx", str(out / "s.onnx"), "--int8",
                  str(out / "s.int8.onnx"), "--recipe", str(recipe)])  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is default_action  # the command put the handler back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 143 and err.getvalue().splitlines()[-1].startswith(
        "distill: stopped by SIGTERM. To resume, run the same command again (what it had not finished was not"
    )
    assert sorted(p.name for p in out.iterdir()) == ["s.onnx"] and (out / "s.onnx").read_text() == "an earlier export\n"


def test_a_sigterm_swallowed_by_code_that_catches_everything_still_stops_the_job():
    """torch-pruning's tracing catches every exception: the stop is kept, and raised again at the next check."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from distill.lightning_cli import stop_if_terminated, stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except BaseException:  # noqa: BLE001 - as torch_pruning.dependency.graph does
            pass
        with pytest.raises(SIGTERMException):
            stop_if_terminated(None)  # after the job's next Trainer run
    assert signal.getsignal(signal.SIGTERM) is before
    stop_if_terminated(None)  # the next command starts afresh


def test_the_int8_line_says_what_it_lost_and_warns_past_the_threshold(tmp_path: Path):
    result = {"float_val_acc": 0.9000, "int8_val_acc": 0.8850, "float_bytes": 4000, "int8_bytes": 1000}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        line = int8_line(tmp_path / "s.int8.onnx", result, QuantOptions(max_accuracy_drop=1.0))
    assert "4.0x smaller" in line and "float32 0.9000, int8 0.8850 (-1.50 points)" in line
    assert (
        err.getvalue().startswith("warning: the int8 model loses 1.50 points")
        and "max_accuracy_drop=1): try calibration_method=entropy or percentile," in err.getvalue()
    )
    with contextlib.redirect_stderr(err := io.StringIO()):  # not the method it used
        int8_line(tmp_path / "s.int8.onnx", result, QuantOptions(calibration_method="entropy", max_accuracy_drop=1.0))
    assert "try calibration_method=minmax or percentile," in err.getvalue()
    with contextlib.redirect_stderr(err := io.StringIO()):
        int8_line(tmp_path / "s.int8.onnx", result, QuantOptions(max_accuracy_drop=2.0))
    assert err.getvalue() == ""


def test_an_example_input_the_model_does_not_run_on_is_one_line_before_any_export(tmp_path: Path):
    """torch.export's error ("Failed to export the model ... step 1/3 ... Modify the model code") blamed the model."""
    student = StudentNet(base=2, num_pools=2, in_chans=1)
    for export_to in (export_onnx, export_pt2):
        with pytest.raises(ValueError, match=r"StudentNet does not run on the example input of shape \(1, 3, 28, 28\)"):
            export_to(student, torch.zeros(1, 3, 28, 28), tmp_path / "new" / "student.file")
    assert not (tmp_path / "new").exists()


def test_an_export_onto_a_checkpoint_or_a_folder_is_refused_and_leaves_it_as_it_was(tmp_path: Path):
    """export_onnx(model, x, "run/best.ckpt") replaced the run's checkpoint with an ONNX file (distill export refused
    it, the Python functions did not)."""
    student, x = StudentNet(base=2, num_pools=2, in_chans=1), torch.zeros(1, 1, 28, 28)
    checkpoint = save_student(student, tmp_path / "run" / "best.ckpt", [1, 28, 28])
    before = checkpoint.read_bytes()
    for export_to, example in ((export_onnx, "student.onnx"), (export_pt2, "student.pt2"),
                               (export_torchscript, "student.pt")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"is a checkpoint; it would be overwritten: .* e\.g\. .*run/{example}$"):
            export_to(student, x, checkpoint)
        with pytest.raises(ValueError, match=rf"is a folder: give a file name, e\.g\. .*run/{example}$"):
            export_to(student, x, tmp_path / "run")
    assert checkpoint.read_bytes() == before and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.ckpt"]


def test_metadata_that_does_not_describe_the_model_is_refused_before_the_file_is_written(tmp_path: Path):
    """A file whose label names are not one per output, or whose mean is not one per channel, is read wrongly by
    whoever deploys it, without an error (metadata of another run's data, given from Python)."""
    student = StudentNet(base=2, num_pools=2, in_chans=1, num_classes=5)
    fits = {"input_size": "[1, 28, 28]", "mean": "[0.28]", "std": "[0.35]", "label_names": json.dumps(list("abcde"))}
    for key, value, match in (
        (
            "label_names",
            json.dumps([str(n) for n in range(10)]),
            r"label_names \['0', .*\] is not one name per output \(5\)\. Give the",
        ),
        ("mean", "[0.5, 0.5, 0.5]", r"mean \[0.5, 0.5, 0.5\] is not one value per input channel \(1\)"),
        ("std", "0.35", r"std 0.35 is not one value per input channel"),
        ("input_size", "[1, 32, 32]", r"input_size \[1, 32, 32\] is not the example input's \[1, 28, 28\]"),
        ("label_names", "a,b,c,d,e", r"metadata\['label_names'\] must be a JSON string"),
    ):
        with pytest.raises(ValueError, match=f"^The metadata does not describe the model: {match}|^{match}"):
            export_onnx(student, torch.zeros(1, 1, 28, 28), tmp_path / "new" / "s.onnx", metadata={**fits, key: value})
    assert not (tmp_path / "new").exists()
    export_onnx(student, torch.zeros(1, 1, 28, 28), tmp_path / "s.onnx", metadata={**fits, "author": "not JSON"})
    said = ort.InferenceSession(str(tmp_path / "s.onnx")).get_modelmeta().custom_metadata_map
    assert said == {**fits, "author": "not JSON"}
    rgb = StudentNet(base=2, num_pools=2, in_chans=3, num_classes=5)  # one mean for all channels broadcasts
    export_onnx(rgb, torch.zeros(1, 3, 28, 28), tmp_path / "rgb.onnx", metadata={**fits, "input_size": "[3, 28, 28]"})


def test_an_export_of_a_student_saved_without_its_data_warns_that_the_file_cannot_say_how_to_feed_it(tmp_path: Path):
    """README's classify.py reads mean, std and label_names from the file: without them it failed with a KeyError."""
    student = StudentNet(base=2, num_pools=2, in_chans=1, num_classes=10)
    save_student(student, tmp_path / "s.ckpt", input_shape=[1, 28, 28])
    with contextlib.redirect_stderr(err := io.StringIO()):
        export(str(tmp_path / "s.ckpt"), onnx=str(tmp_path / "s.onnx"))
    assert err.getvalue().startswith(f"warning: {tmp_path / 's.ckpt'} records no data it was trained on, so the ONNX "
                                     f"file does not say its mean, std, label_names, ")  # fmt: skip
    data = ("FashionMNISTDataModule", fmnist().state_dict())
    before = (tmp_path / "s.ckpt").read_bytes()
    eleven = StudentNet(base=2, num_pools=2, in_chans=1)  # its export named 10 classes for 11 outputs
    with pytest.raises(ValueError, match=r"^data= records 10 classes, and the student has 11 outputs: give the rec"):
        save_student(eleven, tmp_path / "s.ckpt", input_shape=[1, 28, 28], data=data)
    assert (tmp_path / "s.ckpt").read_bytes() == before
    save_student(student, tmp_path / "s.ckpt", input_shape=[1, 28, 28], data=data)
    with contextlib.redirect_stderr(err := io.StringIO()):
        export(str(tmp_path / "s.ckpt"), onnx=str(tmp_path / "s.onnx"))
    assert "warning" not in err.getvalue()
