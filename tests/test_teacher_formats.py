"""Teachers from the files other tools write (issue 18): each made by the tool that really writes it, loaded
safely, and its logits equal to the source model's."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from safetensors.torch import save_file
from timm.models.tresnet import TResNet
from timm.utils import CheckpointSaver, ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill import DistillModule
from distill.rundir import file_digest
from students import create_student
from teachers import TeacherEnsemble, load_teacher, load_teachers, teacher_checkpoints
from teachers.formats import inferred_io

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def source_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def timm_training_checkpoint(folder: Path, model: nn.Module, ema: nn.Module | None, with_args: bool = True) -> Path:
    """What timm's train.py writes: its CheckpointSaver, with the command line's Namespace and EMA weights."""
    args = argparse.Namespace(model="test_resnet", num_classes=10, in_chans=1, lr=0.1, epochs=1, model_ema=True,
                              model_kwargs={}, output=str(folder), device="cpu")  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=args if with_args else None, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1)  # fmt: skip
    saver.save_checkpoint(epoch=0, metric=0.5)
    return folder / "model_best.pth.tar"


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, nn.Module]:
    """A timm training checkpoint whose EMA weights differ from its weights."""
    model = source_model()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update(model)  # halfway between the two
    path = timm_training_checkpoint(tmp_path_factory.mktemp("timm"), model, ema)
    return path, model, ema.module


def test_a_timm_training_checkpoint_names_its_architecture_and_its_ema_weights_are_chosen(timm_run):
    path, model, ema = timm_run
    assert "args" in torch.load(path, map_location="cpu", weights_only=False)  # really what the tool writes
    teacher = load_teacher(checkpoint=path)  # the architecture, classes and channels from args
    torch.testing.assert_close(teacher(X), logits(model), rtol=0, atol=0)
    teacher_ema = load_teacher(checkpoint=path, use_ema=True)
    torch.testing.assert_close(teacher_ema(X), logits(ema), rtol=0, atol=0)
    assert not torch.allclose(teacher(X), teacher_ema(X))
    with pytest.raises(ValueError, match=r"contradicts name='test_efficientnet' \(checkpoint: 'test_resnet'\)"):
        load_teacher("test_efficientnet", checkpoint=path)


def test_teachers_loaded_from_foreign_files_load_again_from_what_they_record(timm_run, tmp_path: Path):
    """A student's checkpoint records how its teacher was loaded: the EMA choice is not lost on reload."""
    path, _, ema = timm_run
    teacher = load_teacher(checkpoint=path, use_ema=True)
    recorded = teacher_checkpoints(teacher)
    assert recorded == {"checkpoint": str(path), "name": "test_resnet", "num_classes": 10, "in_chans": 1,
                        "use_ema": True}  # fmt: skip
    torch.testing.assert_close(load_teachers(recorded)(X), logits(ema), rtol=0, atol=0)
    pair = TeacherEnsemble([teacher, load_teacher(checkpoint=path)], weights=[3, 1], reduction="probs", temperature=2)
    again = load_teachers(teacher_checkpoints(pair))  # members, weights, reduction and temperature
    torch.testing.assert_close(again(X), pair(X), rtol=0, atol=0)
    assert teacher_checkpoints(TeacherEnsemble([teacher, source_model()])) is None  # a member from no file
    with pytest.raises(ValueError, match=r"a recorded teacher holds pretrained; it may hold only checkpoint, name"):
        load_teachers({**recorded, "pretrained": True})  # a crafted record downloads nothing

    module = DistillModule(create_student("test_studentnet", num_classes=10, in_chans=1), teacher)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    data = DataLoader(TensorDataset(X, torch.arange(4)), batch_size=4)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    hparams = torch.load(tmp_path / "student.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["teacher_checkpoint"] == recorded
    reloaded = DistillModule.load_from_checkpoint(tmp_path / "student.ckpt")
    reloaded.check_data(None)  # loads the teacher from the recorded arguments
    torch.testing.assert_close(reloaded.teacher(X), logits(ema), rtol=0, atol=0)


def test_a_timm_checkpoint_without_args_needs_the_name(tmp_path: Path):
    model = source_model()
    path = timm_training_checkpoint(tmp_path, model, None, with_args=False)
    with pytest.raises(ValueError, match=r"does not name its architecture .*'conv1\.' .*pass name="):
        load_teacher(checkpoint=path)
    with pytest.raises(ValueError, match=r"holds no EMA weights \(no state_dict_ema or model_ema; it holds epoch,"):
        load_teacher("test_resnet", checkpoint=path, use_ema=True)
    torch.testing.assert_close(load_teacher("test_resnet", checkpoint=path)(X), logits(model), rtol=0, atol=0)


class _Classifier(pl.LightningModule):
    """A LightningModule of someone else's: the network as ``self.net``, a loss with a buffer of its own."""

    def __init__(self, lr: float = 0.05, twin: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = source_model()
        self.ema_net = source_model(seed=1) if twin else None
        self.loss = nn.CrossEntropyLoss(weight=torch.ones(10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)


def fit_lightning(folder: Path, **kwargs) -> tuple[Path, _Classifier]:
    torch.manual_seed(0)
    module = _Classifier(**kwargs)
    data = DataLoader(TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=folder, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, data)
    return Path(trainer.checkpoint_callback.best_model_path), module


def test_a_lightning_checkpoint_of_another_module_loads_under_the_prefix_that_fits(tmp_path: Path):
    path, module = fit_lightning(tmp_path)
    teacher = load_teacher("test_resnet", checkpoint=path)  # classes and channels from the weights' shapes
    torch.testing.assert_close(teacher(X), logits(module.net), rtol=0, atol=0)
    assert teacher.num_classes == 10
    with pytest.raises(ValueError, match=r"(?s)timm/test_efficientnet.*missing keys: conv_stem.*under 'net\.' "):
        load_teacher("test_efficientnet", checkpoint=path, num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"does not name its architecture \(its weights are under 'net\.' "):
        load_teacher(checkpoint=path)


def test_a_lightning_module_holding_two_models_needs_the_prefix(tmp_path: Path):
    path, module = fit_lightning(tmp_path, twin=True)
    with pytest.raises(ValueError, match=r"under several prefixes \('ema_net\.', 'net\.'\): pass prefix="):
        load_teacher("test_resnet", checkpoint=path)
    teacher = load_teacher("test_resnet", checkpoint=path, prefix="ema_net.")
    torch.testing.assert_close(teacher(X), logits(module.ema_net), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no weights under prefix='teacher\.'; its tensors are under 'net\.' "):
        load_teacher("test_resnet", checkpoint=path, prefix="teacher.")


def test_safetensors_and_timm_hub_folders(tmp_path: Path):
    model = source_model()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    teacher = load_teacher("test_resnet", checkpoint=tmp_path / "weights.safetensors")
    torch.testing.assert_close(teacher(X), logits(model), rtol=0, atol=0)
    resnet = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()  # its blocks hold conv1s too
    save_file(resnet.state_dict(), tmp_path / "resnet.safetensors")
    teacher = load_teacher("resnet18", checkpoint=tmp_path / "resnet.safetensors")  # 1 channel, read from its stem
    torch.testing.assert_close(teacher(X), logits(resnet), rtol=0, atol=0)
    under = lambda prefix, model: {prefix + k: v for k, v in model.state_dict().items()}  # noqa: E731
    other = timm.create_model("resnet18", num_classes=5, in_chans=3)
    assert inferred_io("resnet18", under("model.", resnet) | under("model_ema.", resnet)) == (10, 1)  # copies agree
    assert inferred_io("resnet18", under("student.", resnet) | under("teacher.model.", other)) == (None, None)
    dla = timm.create_model("dla34", num_classes=7, in_chans=2)  # its classifier is a 1x1 convolution
    assert inferred_io("dla34", dla.state_dict()) == (7, 2)
    tresnet = TResNet(layers=[1, 1, 1, 1], in_chans=2, num_classes=7, width_factor=0.25)  # tresnet_m's keys, smaller
    assert inferred_io("tresnet_m", tresnet.state_dict()) == (7, 2)  # its stem takes 4x4 pixels of each: 32 inputs
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_teacher("test_resnet", checkpoint=tmp_path / "bad.safetensors")

    timm.models.save_for_hf(model, tmp_path / "hub", safe_serialization=True)
    teacher = load_teacher(checkpoint=tmp_path / "hub")  # architecture and classes from config.json, offline
    torch.testing.assert_close(teacher(X), logits(model), rtol=0, atol=0)
    assert teacher_checkpoints(teacher)["name"] == "test_resnet"
    before = file_digest(tmp_path / "hub")  # what a run records of its teacher: a retrained folder is another run
    timm.models.save_for_hf(source_model(seed=1), tmp_path / "hub", safe_serialization=True)
    assert file_digest(tmp_path / "hub") != before
    with pytest.raises(ValueError, match=r"a folder without a readable config\.json"):
        load_teacher(checkpoint=tmp_path)


class _Payload:
    """Runs code when unpickled: it would write ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_that_runs_code_is_refused_and_nothing_in_it_runs(tmp_path: Path):
    marker = tmp_path / "ran.txt"
    torch.save({"state_dict": source_model().state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refused as unsafe and nothing in it ran: .*would import builtins\.exec"):
        load_teacher("test_resnet", checkpoint=tmp_path / "evil.pth")
    assert not marker.exists()


def test_every_pickle_protocol_is_refused_for_what_it_is(tmp_path: Path):
    """Protocol 4 and 5 stop torch's own scan: the imports are read from the opcodes, and a harmless file the
    safe loader does not take is not called corrupt."""
    marker = tmp_path / "ran.txt"
    for protocol in (4, 5):
        torch.save({"extra": _Payload(marker)}, tmp_path / f"evil{protocol}.pth", pickle_protocol=protocol)
        with pytest.raises(ValueError, match=r"refused as unsafe and nothing in it ran: .*import builtins\.exec"):
            load_teacher("test_resnet", checkpoint=tmp_path / f"evil{protocol}.pth")
    torch.save(source_model().state_dict(), tmp_path / "plain4.pth", pickle_protocol=4)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"refused by torch's safe loader .* default"):
        load_teacher("test_resnet", checkpoint=tmp_path / "plain4.pth")
    hub = tmp_path / "hub"
    timm.models.save_for_hf(source_model(), hub)  # pytorch_model.bin only
    torch.save({"extra": _Payload(marker)}, hub / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin' was refused as unsafe and nothing in it ran"):
        load_teacher(checkpoint=hub)
    assert not marker.exists()


def test_timm_training_arguments_build_the_model_they_trained(tmp_path: Path):
    """train.py builds its model from args: a pretrained tag, --gp, a model of the trainer's own code."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1, global_pool="max").eval()
    args = argparse.Namespace(model="test_resnet.r160_in1k", num_classes=10, in_chans=1, gp="max", bn_eps=None)
    torch.save({"arch": "test_resnet.r160_in1k", "state_dict": model.state_dict(), "args": args}, tmp_path / "a.pth")
    teacher = load_teacher("test_resnet", checkpoint=tmp_path / "a.pth")  # the tag names weights, not a model
    x = torch.randn(2, 1, 96, 96)  # 3x3 at the pooling: max and mean differ
    torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=0)  # max pooling, as trained
    args.model = "my_registered_resnet"
    torch.save({"arch": "resnet", "state_dict": model.state_dict(), "args": args}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"names 'my_registered_resnet', not a timm model here .* pass name="):
        load_teacher(checkpoint=tmp_path / "b.pth")
    teacher = load_teacher("test_resnet", checkpoint=tmp_path / "b.pth")
    torch.testing.assert_close(teacher(X), logits(model), rtol=0, atol=0)
    args.model_kwargs = {"checkpoint_path": str(tmp_path / "elsewhere.pth")}  # never read: settings from a file
    torch.save({"state_dict": model.state_dict(), "args": args}, tmp_path / "c.pth")
    torch.testing.assert_close(load_teacher("test_resnet", checkpoint=tmp_path / "c.pth")(X), logits(model))


def test_shapes_choose_between_copies_and_ema_submodules_are_pointed_at(tmp_path: Path):
    big, small = source_model(), timm.create_model("test_resnet", num_classes=5, in_chans=1).eval()
    weights = {**{f"student.{k}": v for k, v in big.state_dict().items()},
               **{f"teacher.{k}": v for k, v in small.state_dict().items()}}  # fmt: skip
    save_file(weights, tmp_path / "two.safetensors")
    teacher = load_teacher("test_resnet", checkpoint=tmp_path / "two.safetensors", num_classes=5)
    torch.testing.assert_close(teacher(X), logits(small), rtol=0, atol=0)
    path, _ = fit_lightning(tmp_path, twin=True)
    with pytest.raises(ValueError, match=r"holds no EMA weights .*under 'ema_net\.' may be: pass prefix= instead"):
        load_teacher("test_resnet", checkpoint=path, use_ema=True)


class _HoldsItsLoss(_Classifier):
    """``save_hyperparameters`` picks up a module: the checkpoint holds a pickled CrossEntropyLoss."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_a_lightning_checkpoint_with_objects_in_its_hyperparameters_names_them_and_the_fix(tmp_path: Path):
    module = _HoldsItsLoss(nn.CrossEntropyLoss())
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "objects.ckpt")
    with pytest.raises(ValueError, match=r"import torch\.nn\.modules\.loss\.CrossEntropyLoss.*save_hyperparameters"):
        load_teacher("test_resnet", checkpoint=tmp_path / "objects.ckpt")
