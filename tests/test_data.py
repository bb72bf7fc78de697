"""Datamodules on the real Fashion-MNIST files; file search, damaged files, CIFAR and image folders."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torchvision.datasets
import yaml
from helpers import RunsCode, fmnist
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch.utils.data._utils.pin_memory import pin_memory

from distill.cli import main, one_line
from distill.data import (
    Batch,
    BatchTransform,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DeviceBatches,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    as_batch,
    random_crop,
    random_erase,
)
from distill.data.base import model_data_mismatch
from distill.data.fashion_mnist import FASHION_MNIST_FILES
from distill.data.folder import is_image_file, labelled_images, read_image, visible_classes
from distill.export import deployment_metadata
from distill.recipes import build_datamodule, merge, recipe_identity
from distill.study import open_storage, open_study


@pytest.fixture(scope="module")
def fmnist_files() -> Path:
    """The folder the default search finds (Debian's package, a cache, or a download)."""
    return FashionMNISTDataModule().locate()


def test_fashion_mnist_splits_and_batches():
    dm = fmnist(val_size=5000)
    assert (dm.num_classes, dm.in_chans, dm.input_size) == (10, 1, (28, 28))
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    x, y, teacher_logits = next(iter(dm.train_dataloader()))
    assert teacher_logits is None
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() < 10
    # Normalised with the dataset statistics: roughly zero mean, unit variance over a big batch.
    big = dm.train_set.__getitems__(list(range(5000)))[0]
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_validation_split_is_fixed_and_disjoint():
    a, b = fmnist(val_size=1000), fmnist(val_size=1000)
    train_idx, val_idx = a.split_indices(60_000)
    assert torch.equal(val_idx, b.split_indices(60_000)[1])
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert len(train_idx) + len(val_idx) == 60_000
    assert not torch.equal(val_idx, fmnist(val_size=1000, split_seed=1).split_indices(60_000)[1])
    assert len(fmnist(val_size=0.1).split_indices(60_000)[1]) == 6_000


def test_given_root_comes_first(tmp_path: Path, fmnist_files: Path):
    for name in FASHION_MNIST_FILES:
        shutil.copy(fmnist_files / name, tmp_path / name)
    assert FashionMNISTDataModule(root=str(tmp_path)).locate() == tmp_path
    nested = tmp_path / "tv" / "FashionMNIST" / "raw"  # torchvision's layout
    shutil.copytree(tmp_path, nested, ignore=shutil.ignore_patterns("tv"))
    assert FashionMNISTDataModule(root=str(tmp_path / "tv")).locate() == nested


def test_missing_everywhere_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import distill.data.locate

    monkeypatch.setattr(FashionMNISTDataModule, "system_dir", tmp_path / "system")
    monkeypatch.setattr(distill.data.locate, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(download=False).setup("fit")
    message = str(err.value)
    for place in ("system", "cache", "download (disabled"):
        assert place in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_a_given_root_is_the_only_place_looked(tmp_path: Path, fmnist_files: Path):
    """A mistyped root must not silently train on another copy of the data (the system's here)."""
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(root=str(tmp_path / "mine"), download=False).setup("fit")
    assert "mine" in str(err.value) and str(fmnist_files) not in str(err.value).split("To get it")[0]


@pytest.mark.parametrize("val_size", [1.5, 1.0, 0.0, -3, 60_000, True])
def test_val_size_that_is_neither_a_count_nor_a_fraction_is_refused(val_size):
    with pytest.raises(ValueError, match="val_size"):
        fmnist(val_size=val_size).setup("fit")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_header"])
def test_damaged_files_are_clear_errors(tmp_path: Path, fmnist_files: Path, damage: str):
    for name in FASHION_MNIST_FILES:
        shutil.copy(fmnist_files / name, tmp_path / name)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100_000])
        match = "corrupt or truncated"
    elif damage == "garbage":
        target.write_bytes(b"\x00" * 1000)
        match = "corrupt or truncated"
    else:
        with gzip.open(target, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (16).to_bytes(4, "big") + b"\x00" * 16)
        match = "not an IDX file of unsigned bytes with 3 dimensions"
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")


def test_random_crop_shifts_content_and_keeps_shape():
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    assert torch.equal(random_crop(images, 0), images)
    cropped = random_crop(images, 2)
    assert cropped.shape == images.shape
    for i in range(2):  # each crop is a window of the zero-padded image
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)


def test_augmentation_only_on_the_training_split():
    dm = fmnist(augment=True)
    assert dm.transform(train=True).augment and not dm.transform(train=False).augment
    images = torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8)
    plain = BatchTransform(dm.mean, dm.std)
    assert torch.equal(dm.transform(train=False)(images), plain(images))
    torch.manual_seed(0)
    assert not torch.equal(dm.transform(train=True)(images), plain(images))


def test_random_erasing_fills_one_rectangle_of_each_chosen_image_with_noise():
    torch.manual_seed(0)
    images = torch.full((400, 2, 20, 30), 7.0)
    erased = random_erase(images, probability=1.0)
    for image in (erased != 7.0).all(dim=1):  # every channel of a pixel, or none
        rows, cols = image.any(1).nonzero().flatten(), image.any(0).nonzero().flatten()
        box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and image.sum() == box.numel()  # one filled rectangle
        assert 0.02 * 600 * 0.8 <= box.numel() <= 600 / 3 * 1.3  # its area, up to rounding its sides
        if box.shape[0] < 20 and box.shape[1] < 30 and box.numel() >= 20:  # not cut to the image, not tiny
            assert 0.3 * 0.6 <= box.shape[0] / box.shape[1] <= 3.34 / 0.6  # its aspect, up to rounding
    assert torch.equal((erased != 7.0).any(1), (erased != 7.0).all(1))
    assert abs(erased[erased != 7.0].std().item() - 1.0) < 0.05  # standard normal noise
    assert torch.equal(random_erase(images, probability=0.0), images)
    half = (random_erase(images, probability=0.5) != 7.0).flatten(1).any(1).float().mean().item()
    assert 0.4 < half < 0.6


def test_random_erasing_only_on_the_training_split_and_its_teacher_logits_stay_live():
    dm = fmnist(random_erasing=0.5)
    train, val = dm.transform(train=True), dm.transform(train=False)
    assert train.erasing == 0.5 and train.is_random and val.erasing == 0.0 and not val.is_random
    images = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8)
    torch.manual_seed(0)
    assert not torch.equal(train(images), val(images)) and torch.equal(val(images), val(images))
    with pytest.raises(ValueError, match=r"random_erasing is a probability in \[0, 1\], got 2"):
        fmnist(random_erasing=2)


def test_resize():
    dm = fmnist(resize=32)
    assert dm.input_size == (32, 32)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (32, 32)


def _fake_cifar(root: Path, tv: type[torchvision.datasets.CIFAR10], n: int = 20) -> dict[str, str]:
    """Files in torchvision's layout (its real reader opens them); returns their MD5s by file name."""
    folder = root / tv.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if tv is torchvision.datasets.CIFAR10 else "fine_labels"
    for name, _ in tv.train_list + tv.test_list:
        entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), label_key: rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / tv.meta["filename"], "wb") as f:
        pickle.dump({tv.meta["key"]: [f"class{i}" for i in range(10)]}, f)
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def _trust(monkeypatch: pytest.MonkeyPatch, tv: type[torchvision.datasets.CIFAR10], sums: dict[str, str]) -> None:
    """Make torchvision's MD5 tables name the fake files, so that its own checks and reader run on them."""
    monkeypatch.setattr(tv, "train_list", [[name, sums[name]] for name, _ in tv.train_list])
    monkeypatch.setattr(tv, "test_list", [[name, sums[name]] for name, _ in tv.test_list])
    monkeypatch.setattr(tv, "meta", {**tv.meta, "md5": sums[tv.meta["filename"]]})


def test_cifar_pickles_are_opened_only_with_their_official_checksums(tmp_path: Path):
    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    ran = tmp_path / "code_ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:  # a pickle that would run code
        pickle.dump(RunsCode(str(ran)), f)
    with pytest.raises(ValueError, match="does not match its official MD5 checksum"):
        CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=True).setup("fit")  # old configs
    assert not ran.exists()
    with pytest.raises(ValueError, match="verify_checksums=False is no longer possible"):
        CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False)


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_is_read_by_torchvision_into_uint8_nchw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls):
    tv = cls.torchvision_class
    _trust(monkeypatch, tv, _fake_cifar(tmp_path, tv))
    dm = cls(root=str(tmp_path), download=False, val_size=10, batch_size=4)
    assert (dm.in_chans, dm.input_size) == (3, (32, 32))
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20 * len(tv.train_list) - 10, 10, 20)
    with open(tmp_path / tv.base_folder / tv.test_list[0][0], "rb") as f:
        entry = pickle.load(f)
    expected = torch.from_numpy(entry["data"].reshape(-1, 3, 32, 32))  # the pickle's own (N, C, H, W) layout
    assert torch.equal(dm.test_set.images, expected) and dm.test_set.images.is_contiguous()
    assert dm.test_set.labels.tolist() == entry["labels" if tv is torchvision.datasets.CIFAR10 else "fine_labels"]
    assert next(iter(dm.train_dataloader())).x.shape == (4, 3, 32, 32)
    assert dm.state_dict()["classes"] == [f"class{i}" for i in range(10)]  # the meta file's, which checkpoints record


def test_cifar_missing_names_the_fix(tmp_path: Path):
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-100 was not found.*download \(disabled.*pass that folder as root"
    ):
        CIFAR100DataModule(root=str(tmp_path), download=False).setup("fit")


def test_loaders_yield_batches_with_the_cached_logits():
    dm = fmnist(val_size=100, batch_size=8)
    dm.setup("fit")
    loader = dm.val_dataloader()  # the CPU DataLoader path (not shuffled)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.teacher_logits is None
    logits = torch.randn(len(dm.val_set), 10)
    dm.val_set.teacher_logits = logits  # as TeacherLogitCache sets them
    for batches in (loader, DeviceBatches(dm.val_set, 8, shuffle=False)):
        batch = next(iter(batches))
        assert isinstance(batch, Batch) and torch.equal(batch.teacher_logits, logits[:8])
    # Lightning's transfer to the device and torch's pinning keep the named tuple and its None.
    moved = move_data_to_device(Batch(batch.x, batch.y), torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.teacher_logits is None
    if torch.cuda.is_available():
        pinned = pin_memory(Batch(batch.x, batch.y))
        assert isinstance(pinned, Batch) and pinned.x.is_pinned() and pinned.teacher_logits is None
    assert as_batch((batch.x, batch.y)) == Batch(batch.x, batch.y)
    with pytest.raises(ValueError, match="a batch is"):
        as_batch((batch.x,))


def test_image_folder(tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("apple", "bread", "cheese"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, batch_size=4, val_size=3, num_workers=0)
    assert (dm.num_classes, dm.in_chans, dm.input_size) == (3, 3, (32, 32))
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 12)
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, Batch) and batch.teacher_logits is None
    assert batch.x.shape == (3, 3, 32, 32) and batch.y.max() < 3
    with pytest.raises(FileNotFoundError, match="training folder"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    for size in (0, -5, 2.5):  # 0 was refused as if the student needed in_chans=3
        with pytest.raises(ValueError, match=f"image_size must be a number of pixels >= 1, got {size}"):
            ImageFolderDataModule(str(tmp_path), image_size=size)
    (tmp_path / "one" / "train" / "apple").mkdir(parents=True)  # val/acc read 1.000 and KD's soft term 0
    with pytest.raises(ValueError, match=r"holds one class folder \(apple\); a classifier needs at least two"):
        ImageFolderDataModule(str(tmp_path / "one"))
    # The split follows the shared rule: a float is a fraction, so 5000.0 is refused, as by every datamodule.
    for val_size in (5000.0, 1.5, 0, True):
        with pytest.raises(ValueError, match="val_size must be a number of images"):
            ImageFolderDataModule(str(tmp_path), val_size=val_size)
        with pytest.raises(ValueError, match="val_size must be a number of images"):
            fmnist(val_size=val_size)
    assert ImageFolderDataModule(str(tmp_path), val_size=0.25).split_indices(12)[1].tolist() == (
        fmnist(val_size=0.25).split_indices(12)[1].tolist()
    )
    # What export --int8 calibrates on: the recipe's datamodule with its random settings off (it has no erasing).
    folder = build_datamodule({"data": {"class_path": "distill.data.ImageFolderDataModule",
                                        "init_args": {"root": str(tmp_path), "image_size": 32}}}, "recipe")  # fmt: skip
    assert isinstance(folder, ImageFolderDataModule) and not folder.augment
    erasing = {"class_path": "distill.data.FashionMNISTDataModule", "init_args": {"random_erasing": 0.5}}
    assert build_datamodule({"data": erasing}, "recipe").random_erasing == 0.0


def test_an_unreadable_image_found_by_a_worker_is_named_in_one_line_and_the_run_before_is_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    _image_folder(tmp_path)
    run = tmp_path / "run"
    checkpoint = {"dirpath": str(run), "filename": "best", "monitor": "val/acc", "mode": "max", "save_last": True,
                  "enable_version_counter": False}  # fmt: skip
    data = {"root": str(tmp_path), "test_dir": None, "image_size": 16, "batch_size": 4, "val_size": 2, "num_workers": 1}
    logger = {"class_path": "CSVLogger", "init_args": {"save_dir": str(run), "name": "", "version": ""}}
    cfg = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": logger, "callbacks": [{"class_path": "ModelCheckpoint", "init_args": checkpoint}]},
        "model": {"student": {"class_path": "students.StudentNet", "init_args": {"base": 2, "num_pools": 2}}},
        "data": {"class_path": "distill.data.ImageFolderDataModule", "init_args": data},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    assert {"best.ckpt", "last.ckpt", "config.yaml", "hparams.yaml", "metrics.csv"} <= set(before)
    broken = tmp_path / "train" / "bread" / "3.png"
    broken.write_bytes(b"half a download")  # found only when a worker decodes it, mid-epoch
    with pytest.raises(SystemExit) as stop:  # a new run in the same folder, with another learning rate
        main(["fit", "--config", str(tmp_path / "fit.yaml"), "--model.lr", "0.05"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error:")]
    assert stop.value.code == 2 and len(lines) == 1
    assert f"{broken} is not a readable image (PIL cannot tell its format): remove or replace it" in lines[0]
    # its config, hyperparameters and metrics were replaced before the image was read: they are put back, so the
    # checkpoints are not left beside another run's records
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


@pytest.mark.parametrize("raised", [ValueError("bad label 7\nin row 3"), "PIL"], ids=["builtin", "qualified name"])
def test_a_workers_error_is_its_own_message_on_one_line(raised: Exception | str):
    from PIL import UnidentifiedImageError
    from torch._utils import ExceptionWrapper

    raised = UnidentifiedImageError("cannot identify image file 'x.png'") if raised == "PIL" else raised
    try:
        raise raised
    except Exception:  # noqa: BLE001 - as a DataLoader worker wraps whatever it caught
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(type(raised)) as caught:
        wrapped.reraise()  # the main process's error: the worker's traceback, then its message
    assert "Original Traceback" in str(caught.value)
    assert one_line(caught.value) == " ".join(str(raised).split())


def _image_folder(
    root: Path, names: tuple[str, ...] = ("0", "1", "2", "3"), classes: tuple[str, ...] = ("apple", "bread")
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in classes:
        (root / "train" / cls).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / cls / f"{name}.png")
    return root


def test_an_image_folder_evaluates_as_timm_does_with_what_its_exported_files_say(tmp_path: Path):
    """An exported file says ``crop_pct`` and ``interpolation`` as timm's ``pretrained_cfg`` does: whoever feeds it
    with timm's evaluation transform must get the images the model was scored on (at 20 pixels timm resizes to
    floor(20 / 0.875) = 22, where rounding gave 23)."""
    from PIL import Image
    from timm.data.transforms_factory import transforms_imagenet_eval

    root = _image_folder(tmp_path / "data")
    shutil.copytree(root / "train", root / "test")
    pixels = np.random.default_rng(1).integers(0, 255, (30, 41, 3), dtype=np.uint8)  # not square
    Image.fromarray(pixels).save(root / "test" / "apple" / "0.png")
    dm = ImageFolderDataModule(str(root), image_size=20, val_size=2, num_workers=0)
    dm.setup("test")
    said = dm.model_inputs()
    timm_eval = transforms_imagenet_eval(20, crop_pct=said["crop_pct"], interpolation=said["interpolation"],
                                         mean=dm.mean, std=dm.std)  # fmt: skip
    expected = timm_eval(read_image(str(root / "test" / "apple" / "0.png")))
    assert torch.equal(dm.test_set[0][0], expected) and expected.shape == (3, 20, 20)

    for size in (14, 56):  # Fashion-MNIST resized, smaller (antialiased, as PIL) and larger: whole images, bilinear
        fashion = fmnist(resize=size, on_device=False)
        fashion.setup("test")
        said = fashion.model_inputs()
        timm_eval = transforms_imagenet_eval(size, crop_pct=said["crop_pct"], interpolation=said["interpolation"],
                                             mean=fashion.mean, std=fashion.std)  # fmt: skip
        raw = fashion.test_set.images[:16]
        expected = torch.stack([timm_eval(Image.fromarray(image[0].numpy())) for image in raw])
        difference = (fashion.test_set.transform(raw) - expected).abs().max()
        assert said["crop_pct"] == 1.0 and difference < 1.05 / 255 / fashion.std[0], size  # PIL's uint8 rounding


def test_a_fit_resumes_on_its_image_folder_moved_but_not_on_other_images_or_another_datamodule(tmp_path: Path):
    run = tmp_path / "run"
    data = {
        "root": str(_image_folder(tmp_path / "data")),
        "test_dir": None,
        "image_size": 16,
        "batch_size": 4,
        "val_size": 2,
        "num_workers": 0,
    }
    cfg = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "default_root_dir": str(run), "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": {"class_path": "CSVLogger",
                                                              "init_args": {"save_dir": str(run), "version": ""}},
                    "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(run),
                                                                                  "save_last": True}}]},
        "model": {"student": {"class_path": "students.StudentNet", "init_args": {"base": 2, "num_pools": 2}}},
        "data": {"class_path": "distill.data.ImageFolderDataModule", "init_args": data},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    resume = ["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.max_epochs", "2", "--ckpt_path"]
    record = torch.load(run / "last.ckpt", weights_only=False)
    other_class = dict(record, CIFAR10DataModule=record.pop("ImageFolderDataModule"))  # as a CIFAR-10 run records it
    torch.save(other_class, tmp_path / "cifar.ckpt")
    _image_folder(tmp_path / "renamed", names=("0", "1", "2", "x"))  # the same classes and count, one other file
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for args, words in (
        ([str(tmp_path / "cifar.ckpt")], "was trained on the data of CIFAR10DataModule, but this run's data is "
                                         "ImageFolderDataModule"),
        (["last", "--data.init_args.root", str(tmp_path / "renamed")], "was trained with data files='8 images in 2 "
                                                                       "classes, listing "),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
            main([*resume, *args])
        lines = [line for line in err.getvalue().splitlines() if line.startswith("distill: error:")]
        assert stop.value.code == 2 and len(lines) == 1 and words in lines[0], err.getvalue()
        assert "would learn from" in lines[0] and {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    shutil.copytree(tmp_path / "data" / "train", tmp_path / "moved" / "training")  # the same images elsewhere,
    moved = ["--data.init_args.root", str(tmp_path / "moved"), "--data.init_args.train_dir", "training"]  # renamed
    main([*resume, "last", *moved])  # the run goes on
    assert torch.load(run / "last.ckpt", weights_only=False)["epoch"] == 1


def test_image_folder_settings_that_would_mislead_are_refused_and_odd_files_are_read_as_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from PIL import Image

    root = _image_folder(tmp_path / "data")
    for settings, words in (
        ({"mean": [0.5, 0.5]}, r"mean and std need 3 finite numbers each .* got mean=\[0.5, 0.5\]"),
        ({"std": [0.2, 0.0, 0.2]}, "std > 0"),
        ({"val_dir": "train"}, "val_dir='train' is the training folder: the model would be scored on images it"),
        ({"test_dir": "./train/"}, "test_dir='./train/' is the training folder"),
        ({"val_dir": "test/"}, "val_dir='test/' is the test folder: the best checkpoint .* would be chosen on the"),
        (
            {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},  # as other tools give them
            r"are on the 0-255 scale, but pixels are read as 0-1: give them divided by 255 \(mean=\[0.485, 0.456, "
            r"0.406\], std=\[0.229, 0.224, 0.225\]\)",
        ),
    ):
        with pytest.raises(ValueError, match=words):
            ImageFolderDataModule(str(root), **settings)

    (root / "train" / "apple" / "._0.png").write_bytes(b"\0\5\26\7 a macOS resource fork")  # left by its archives
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "apple" / ".thumbs"):  # Jupyter's, a cache
        hidden.mkdir()
        shutil.copy(root / "train" / "apple" / "0.png", hidden / "0.png")
    bits = {"apple": 10_000, "bread": 50_000}  # 16-bit grayscale: RGB conversion alone clips both to 255
    for cls, value in bits.items():
        Image.fromarray(np.full((20, 20), value, dtype=np.uint16)).save(root / "train" / cls / "deep.png")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, val_size=2, test_dir=None, num_workers=0)
    dm.setup("fit")
    files = [Path(path).name for path, _ in dm.train_set.dataset.samples]
    assert "._0.png" not in files and len(files) == 10 and dm.classes == ["apple", "bread"]  # nothing hidden
    assert dm.image_identity(test=False)["files"].startswith("10 images in 2 classes")  # what the records list
    read = {cls: np.asarray(read_image(str(root / "train" / cls / "deep.png"))) for cls in bits}
    assert {cls: int(pixels.max()) for cls, pixels in read.items()} == {"apple": 39, "bread": 195}  # value / 257
    Image.fromarray(np.full((4, 4), 50_000, dtype=np.uint16)).save(tmp_path / "deep.pgm")  # PIL reads it as mode I
    assert (
        Image.open(tmp_path / "deep.pgm").mode == "I"
        and np.asarray(read_image(str(tmp_path / "deep.pgm"))).max() == 195
    )
    Image.fromarray(np.full((4, 4), -5, dtype=np.int32)).save(tmp_path / "signed.tif")
    with pytest.raises(ValueError, match=r"signed.tif is not a readable image \(I pixels of -5 to -5 have no fixed"):
        read_image(str(tmp_path / "signed.tif"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20 x 20 is then a decompression bomb: PIL refuses it
    with pytest.raises(ValueError, match=r"0.png is not a readable image \(Image size \(400 pixels\) exceeds limit"):
        read_image(str(root / "train" / "apple" / "0.png"))

    (root / "test" / "apple").mkdir(parents=True)
    (root / "test" / "bread").mkdir()  # no images in it
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "test" / "apple" / "0.png")
    with pytest.raises(ValueError, match=r"test: Found no valid file for the classes bread: put image files \(.jpg"):
        ImageFolderDataModule(str(root), image_size=16).setup("test")
    (root / "unlabelled").mkdir()  # images without class folders: nothing to score them against
    shutil.copy(root / "train" / "apple" / "0.png", root / "unlabelled")
    with pytest.raises(
        ValueError, match=r"unlabelled holds no class folder: put each class's images in a folder of its"
    ):
        ImageFolderDataModule(str(root), image_size=16, test_dir="unlabelled").setup("test")
    link = root / "train" / "bread" / "up"
    for target in ("..", "../../..", "."):  # a link loop: bread's images again, apple's listed as bread's, ...
        link.symlink_to(target)
        with pytest.raises(ValueError, match=r"bread/up links to .*, a folder it lies in, so its images would be read"):
            ImageFolderDataModule(str(root), image_size=16, test_dir=None, val_size=2).setup("fit")
        link.unlink()


def test_image_folders_list_their_images_as_torchvision_does(tmp_path: Path):
    """The order and labels pick the validation images (by index) and make a run's listing digest: any change to
    them would move every user's split without a word."""
    root, outside = tmp_path / "split", tmp_path / "outside"
    for folder in ("a", "a b", "a-b", "a.b", "B", "sub/x", "sub-x/y", ".hidden"):
        for cls in ("cat", "cat-2", "dog"):
            (root / cls / folder).mkdir(parents=True)
            for name in ("1.png", "a b.jpg", "A.png", ".x.png", "notes.txt"):
                (root / cls / folder / name).write_bytes(b"")
    (outside / "q").mkdir(parents=True)
    (outside / "q" / "1.png").write_bytes(b"")
    (root / "dog" / "linked").symlink_to(outside)  # a folder elsewhere, followed
    (root / "cat" / "sibling").symlink_to(root / "dog" / "a")  # another class's folder: listed as this one's too
    (root / "cat" / "file.png").symlink_to(root / "dog" / "a" / "1.png")
    (root / "cat" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    classes = visible_classes(root)
    own = {name: i for i, name in enumerate(classes)}
    expected = torchvision.datasets.folder.make_dataset(str(root), own, is_valid_file=lambda p: is_image_file(p, root))
    assert labelled_images(root, classes) == expected and len(expected) == 3 * 7 * 3 + 1 + 3 + 2


def test_a_job_checks_the_test_split_before_it_trains_and_export_names_why_its_data_does_not_build(tmp_path: Path):
    from PIL import Image

    root = _image_folder(tmp_path / "data")
    (root / "test" / "apple").mkdir(parents=True)  # a test split without bread: found after training, before
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "test" / "apple" / "0.png")
    data = {"root": str(root), "image_size": 16, "batch_size": 4, "val_size": 2, "num_workers": 0}
    run = str(tmp_path / "run")  # the checkpoint beside its config.yaml, as configs/fmnist/kd.yaml writes them
    best = {"class_path": "ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max", "dirpath": run}}
    cfg = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "callbacks": [best],
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": run, "name": "", "version": ""}}},
        "model": {"student": {"class_path": "students.StudentNet", "init_args": {"base": 2, "num_pools": 2}}},
        "data": {"class_path": "distill.data.ImageFolderDataModule", "init_args": data},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])  # fit does not test: its student is the jobs' teacher
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    cfg["model"]["teacher"] = {"class_path": "teachers.load_teacher", "init_args": {"checkpoint": str(checkpoint)}}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(cfg))
    job = ["sweep", "--recipe", str(tmp_path / "kd.yaml"), "--temperatures", "[2]", "--baseline", "false"]
    job += ["--run_dir", str(tmp_path / "sweep")]
    no_test = ["--overrides", "{data: {init_args: {test_dir: null}}}"]
    for args, words in (
        ([], "test has classes ['apple'], but train has ['apple', 'bread']"),
        (no_test, "ImageFolderDataModule has no test split, and a job tests each run it trains: give the recipe's"),
    ):
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
            main([*job, *args])
        lines = [line for line in err.getvalue().splitlines() if line.startswith("distill: error:")]
        assert stop.value.code == 2 and len(lines) == 1 and words in lines[0], err.getvalue()
        assert not (tmp_path / "sweep").exists()

    # Other images in the same folder are another run: a sweep's trials would be compared across them.
    (root / "test" / "bread").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "test" / "bread" / "0.png")
    main([*job, "--seeds", "[0]"])
    identity = recipe_identity(cfg)  # what prune-distill and each job's fit record of the recipe
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "train" / "bread" / "added.png")
    assert recipe_identity(cfg) != identity
    before = {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
        main([*job, "--seeds", "[0]"])
    assert stop.value.code == 2 and "was created for other images (recipe: 8 images in 2 classes" in err.getvalue()
    assert {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*") if p.is_file()} == before
    (root / "train" / "bread" / "added.png").unlink()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "test" / "bread" / "1.png")
    assert recipe_identity(cfg) != identity  # another test split: the runs' test accuracies are of other images
    (root / "test" / "bread" / "1.png").unlink()

    root.rename(tmp_path / "moved")  # the data the run's config.yaml names is elsewhere now
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["export", str(checkpoint), "--int8", str(tmp_path / "student.int8.onnx")])
    assert stop.value.code == 2
    assert "(give --recipe to calibrate on data elsewhere): its data section does not build: ImageFolderDataModule: " \
           f"training folder {root / 'train'} does not exist" in err.getvalue()  # fmt: skip

    # The same images elsewhere (a copy on a cluster node's scratch) are the same recipe: the sweep's trial is reused.
    moved = {"data": {"init_args": {"root": str(tmp_path / "moved")}}}
    assert recipe_identity(merge(cfg, moved)) == identity
    predicting = {"data": {"init_args": {"predict_dir": str(tmp_path / "new")}}}  # read by `distill predict` only
    assert recipe_identity(merge(merge(cfg, moved), predicting)) == identity
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("*.ckpt")}
    main([*job, "--seeds", "[0]", "--overrides", json.dumps(moved)])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("*.ckpt")} == trained and trained


def test_a_study_is_taken_up_on_its_images_elsewhere_and_as_a_study_made_before_recorded_it(tmp_path: Path):
    from PIL import Image

    root = _image_folder(tmp_path / "data")
    shutil.copytree(root / "train", root / "test", ignore=shutil.ignore_patterns("[123].png"))  # 1 image a class
    data = {"root": str(root), "image_size": 16, "val_size": 2}
    (tmp_path / "teacher.ckpt").write_bytes(b"weights")  # read by its digest
    teacher = {"class_path": "teachers.load_teacher", "init_args": {"checkpoint": str(tmp_path / "teacher.ckpt")}}
    cfg = {
        "model": {"teacher": teacher},
        "data": {"class_path": "distill.data.ImageFolderDataModule", "init_args": data},
    }
    space, url = {"seed": [0]}, f"sqlite:///{tmp_path / 'sweep.db'}"
    rdb = open_storage(url, heartbeat_interval=30)
    old, new = (open_study(rdb, url, name, space, cfg) for name in ("old", "new"))
    listing = new.user_attrs["images"]["recipe"]
    assert listing["test_files"].startswith("2 images in 2 classes, listing ")
    old.set_user_attr("recipe", json.dumps(cfg, sort_keys=True))  # as a study made before recorded it: the root's
    old.set_user_attr("images", {"recipe": {"files": listing["files"]}})  # path, its training images' listing
    for study in (old, new):  # a finished trial: the study is held to its recipe
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    open_study(rdb, url, "old", space, cfg)
    shutil.copytree(root, tmp_path / "copy")
    shutil.copy(tmp_path / "teacher.ckpt", tmp_path / "copy")
    elsewhere = merge(
        cfg,
        {
            "data": {"init_args": {"root": str(tmp_path / "copy")}},
            "model": {"teacher": {"init_args": {"checkpoint": str(tmp_path / "copy" / "teacher.ckpt")}}},
        },
    )
    open_study(rdb, url, "new", space, elsewhere)  # the same images and teacher on another worker's disk
    open_study(rdb, url, "new", space, merge(elsewhere, {"data": {"init_args": {"predict_dir": "new"}}}))
    was = f"other images \\(recipe: {listing['files']}, test split {listing['test_files']}, {listing['bytes']}; now "
    shutil.copytree(root, tmp_path / "resized")
    for image in (tmp_path / "resized").rglob("*.png"):  # another export under the same names
        Image.open(image).resize((10, 10)).save(image)
    shutil.copy(root / "train" / "apple" / "1.png", tmp_path / "copy" / "test" / "apple")
    for name, other, words in (
        ("new", elsewhere, was),  # another test split: the trials' test accuracies would be of other images
        ("new", merge(elsewhere, {"data": {"init_args": {"root": str(tmp_path / "resized")}}}), "other images"),
        ("old", elsewhere, "another recipe"),  # a study made before holds its images to their path
        ("new", merge(elsewhere, {"data": {"init_args": {"image_size": 12}}}), "another recipe"),
    ):
        with pytest.raises(ValueError, match=f"The study '{name}' in .* was created for {words}"):
            open_study(rdb, url, name, space, other)


def test_a_teacher_or_an_evaluated_checkpoint_is_held_to_the_classes_and_normalisation_of_its_data(tmp_path: Path):
    """A teacher trained on folders of other names (same count) would teach wrong soft labels at full
    confidence, and a checkpoint evaluated on them would score nothing meaningful; both are refused in one line."""
    data = {"root": str(_image_folder(tmp_path / "data")), "test_dir": None, "image_size": 16, "batch_size": 4,
            "val_size": 2, "num_workers": 0}  # fmt: skip
    run = tmp_path / "run"
    kept = {"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(run), "save_last": True}}
    cfg = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                    "enable_model_summary": False, "callbacks": [kept], "default_root_dir": str(run)},
        "model": {"student": {"class_path": "students.StudentNet", "init_args": {"base": 2, "num_pools": 2}}},
        "data": {"class_path": "distill.data.ImageFolderDataModule", "init_args": data},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    checkpoint = next(run.glob("epoch=*.ckpt"))
    recorded = torch.load(checkpoint, weights_only=False)["ImageFolderDataModule"]
    assert recorded["classes"] == ["apple", "bread"] and recorded["inputs"]["size"] == [16, 16]
    shipped = deployment_metadata(("", recorded), [3, 16, 16])  # what an exported file says: resized as timm does
    assert [json.loads(shipped[k]) for k in ("crop_pct", "interpolation")] == [0.875, "bilinear"]
    cherry = str(_image_folder(tmp_path / "other", classes=("apple", "cherry")))
    kd = dict(cfg, model={**cfg["model"], "teacher_checkpoint": str(checkpoint)})
    kd["trainer"] = {**cfg["trainer"], "callbacks": [], "default_root_dir": str(tmp_path / "kd")}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(kd))
    loaded = {"class_path": "students.load_student", "init_args": {"path": str(checkpoint)}}  # no --ckpt_path needed
    (tmp_path / "loaded.yaml").write_text(yaml.safe_dump(dict(cfg, model={"student": loaded})))
    fit, validate = (["fit", "--config", str(tmp_path / "kd.yaml")],
                     ["validate", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(checkpoint)])  # fmt: skip
    classes = "class 1 is 'bread' there, 'cherry' here; 2 classes there"
    normalisation = "its normalisation differs from this data's (mean [0.485, 0.456, 0.406] there, [0.5, 0.5, 0.5] here"
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(kd).replace(data["root"], cherry))  # --recipe of export
    fit = [*fit, "--data.init_args.root", data["root"]]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / ".hidden.png").write_bytes((Path(data["root"]) / "train/apple/0.png").read_bytes())
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, words in (
        ([*fit, "--data.init_args.root", cherry], f"teacher {checkpoint} was trained on ImageFolderDataModule data, "
                                                  f"and its classes differ from this data's ({classes})"),
        ([*fit, "--data.init_args.mean", "[0.5, 0.5, 0.5]"], normalisation),
        ([*validate, "--data.init_args.root", cherry], f"{classes}): its validate results would mean nothing"),
        ([*validate, "--data.init_args.mean", "[0.5, 0.5, 0.5]"], f"{normalisation}): its validate results would"),
        ([*validate[:3], "--ckpt_path", "last", "--data.init_args.root", cherry],
         f"--ckpt_path last ({run / 'last.ckpt'}) was trained on Image"),
        (["predict", "--config", str(tmp_path / "loaded.yaml"), "--data.init_args.root", cherry],
         "The student (students.load_student) was trained on ImageFolderDataModule data, and its classes differ"),
        (["predict", "--config", str(tmp_path / "loaded.yaml")],
         "ImageFolderDataModule has no test split (test_dir is null): give data.init_args.test_dir, a folder of"),
        (["predict", *validate[1:], "--data.init_args.predict_dir", "new"],
         f"ImageFolderDataModule: predict_dir {Path(data['root']) / 'new'} does not exist"),
        (["predict", *validate[1:], "--data.init_args.predict_dir", str(tmp_path / "empty")],
         f"ImageFolderDataModule: predict_dir {tmp_path / 'empty'} holds no image file"),
        (["predict", *validate[1:], "--data.init_args.predict_dir", str(tmp_path / "empty" / "a" / ".hidden.png")],
         f"predict_dir {tmp_path / 'empty' / 'a' / '.hidden.png'} is a file: give the folder that holds the images"),
        (["predict", *validate[1:], "--data.init_args.predict_dir", ""],
         "ImageFolderDataModule: predict_dir is empty"),  # root itself, the training images with the rest
        (["export", str(checkpoint), "--int8", str(tmp_path / "s.int8.onnx"), "--recipe", str(tmp_path / "kd.yaml")],
         "int8 would be calibrated and scored on the wrong images"),  # kd.yaml, with cherry as its root below
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
            main(args)
        lines = [line for line in err.getvalue().splitlines() if line.startswith("distill: error:")]
        assert stop.value.code == 2 and len(lines) == 1 and words in lines[0], err.getvalue()
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    shutil.copytree(Path(data["root"]) / "train", Path(data["root"]) / "test")  # predictions name classes and files
    writer = ["--trainer.callbacks+=distill.PredictionWriter", f"--trainer.callbacks.path={tmp_path / 'pred.csv'}"]
    main(["predict", *validate[1:], "--data.init_args.test_dir", "test", *writer])
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label_name"], Path(r["file"]).relative_to(data["root"]).parts[:2]) for r in rows] == [
        (cls, ("test", cls)) for cls in ("apple", "bread") for _ in range(4)
    ] and all(r["predicted_name"] == ("apple", "bread")[int(r["predicted"])] for r in rows)
    new = tmp_path / "new"  # images to classify, unlabelled, at any depth; a hidden one is no image
    for name in ("b.png", "a/c.png", "a/.d.png", ".cache/e.png"):
        (new / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(data["root"]) / "train" / "bread" / "1.png", new / name)
    main(["predict", *validate[1:], "--data.init_args.predict_dir", str(new), *writer])
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["label"], r["label_name"], r["file"]) for r in rows] == [
        ("0", "-1", "", str(new / "a" / "c.png")),
        ("1", "-1", "", str(new / "b.png")),
    ] and rows[0]["predicted_name"] == rows[1]["predicted_name"] == ("apple", "bread")[int(rows[0]["predicted"])]

    close = ImageFolderDataModule(data["root"], test_dir=None, image_size=16, mean=[0.4850001, 0.456, 0.406])
    close.classes = np.array(["apple", "bread"])  # numpy's strings, a float32 copy of a mean: the same data
    assert model_data_mismatch(recorded, close) == (None, None)
    close.classes = ["apple", "br\u00e9ad"]  # the same name, composed here and decomposed there (macOS, zip tools)
    assert model_data_mismatch(dict(recorded, classes=["apple", "bre\u0301ad"]), close) == (None, None)

    from distill import DistillModule  # another input size costs accuracy: a warning, and the run goes on
    from students import StudentNet

    larger = ImageFolderDataModule(data["root"], test_dir=None, image_size=20)
    model = DistillModule(
        StudentNet(num_classes=2, in_chans=3, base=2, num_pools=2), teacher_checkpoint=str(checkpoint)
    )
    with pytest.warns(UserWarning, match="was trained on ImageFolderDataModule data, and its images were 16x16, and "
                                         "this data's are 20x20: a teacher usually scores lower"):  # fmt: skip
        assert model.check_data(larger) == 2
