"""Teacher-logit cache: equal to the live teacher, reused from disk, invalidated by a new teacher or data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import fmnist, tiny_trainer

from distill import DistillModule, KDLoss
from distill.cache import TeacherLogitCache, split_fingerprint
from students import create_student
from teachers import load_teacher, weights_digest


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("test_studentnet", num_classes=10, in_chans=1, num_pools=3)


def run(
    tmp_path: Path, small_teacher_checkpoint: Path, callbacks: list, mixup: dict | None = None, **data
) -> tuple[DistillModule, dict]:
    teacher = load_teacher(checkpoint=small_teacher_checkpoint)
    model = DistillModule(student(), teacher, loss=KDLoss(4.0, 0.7), lr=0.01, mixup=mixup)
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    datamodule = fmnist(**data)
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    model.datamodule = datamodule
    return model, metrics


def test_cached_logits_train_exactly_like_the_live_teacher(tmp_path: Path, small_teacher_checkpoint: Path):
    live_model, live = run(tmp_path / "live", small_teacher_checkpoint, [])
    cache = TeacherLogitCache(cache_dir=str(tmp_path / "cache"))
    cached_model, cached = run(tmp_path / "cached", small_teacher_checkpoint, [cache])
    for key in ("train/loss", "train/kd", "val/loss", "val/kd", "val/teacher_acc", "test/kd", "test/acc"):
        assert cached[key] == pytest.approx(live[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(live_model.student.parameters(), cached_model.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # train, val, test


def test_cache_is_reused_and_keyed_by_teacher_and_data(tmp_path: Path, small_teacher_checkpoint: Path):
    cache_dir = str(tmp_path / "cache")
    run(tmp_path / "a", small_teacher_checkpoint, [TeacherLogitCache(cache_dir)])
    again = TeacherLogitCache(cache_dir)
    run(tmp_path / "b", small_teacher_checkpoint, [again])
    assert sorted(again.hits) == ["test", "train", "val"]

    other = load_teacher(checkpoint=small_teacher_checkpoint)  # the same teacher, one weight changed
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    assert weights_digest(other) != weights_digest(load_teacher(checkpoint=small_teacher_checkpoint))
    dm = fmnist()
    dm.setup("fit")
    resized = fmnist(resize=32)
    resized.setup("fit")
    assert split_fingerprint(dm.val_set) != split_fingerprint(dm.train_set)
    assert split_fingerprint(dm.val_set) != split_fingerprint(resized.val_set)

    fresh = TeacherLogitCache(cache_dir)
    run(tmp_path / "c", small_teacher_checkpoint, [fresh], val_size=600)  # another split: nothing reused
    assert fresh.hits == ["test"]

    damaged = min(Path(cache_dir).glob("*.pt"), key=lambda p: p.stat().st_size)  # run a's 500 validation images
    good = torch.load(damaged, weights_only=True)
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, e.g. by a full disk
    recomputed = TeacherLogitCache(cache_dir)
    with pytest.warns(UserWarning, match="not a readable torch file.* It is computed again"):
        run(tmp_path / "d", small_teacher_checkpoint, [recomputed])
    assert sorted(recomputed.hits) == ["test", "train"]
    assert torch.equal(torch.load(damaged, weights_only=True)["logits"], good["logits"])


def test_workers_started_together_fill_the_cache_once(tmp_path: Path, small_teacher_checkpoint: Path):
    """Sweep workers that need the same logits at once: one computes them, the others wait and read its file."""
    dm = fmnist()
    dm.setup("fit")
    teacher = load_teacher(checkpoint=small_teacher_checkpoint)
    images_seen = []
    teacher.register_forward_hook(lambda _m, args, _o: images_seen.append(len(args[0])))
    module = DistillModule(student(), teacher)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    caches = [TeacherLogitCache(str(tmp_path / "cache")) for _ in range(3)]
    key = weights_digest(teacher) + split_fingerprint(dm.train_set)
    with ThreadPoolExecutor(len(caches)) as pool:  # each cache opens its own lock file handle, as processes do
        fills = [pool.submit(c._load_or_compute, key, teacher, dm.train_set, trainer, module, "train") for c in caches]
        logits = [f.result() for f in fills]
    assert sum(images_seen) == len(dm.train_set)  # the teacher ran over the split once
    assert sorted(len(c.hits) for c in caches) == [0, 1, 1]
    assert all(torch.equal(x, logits[0]) for x in logits)


@pytest.mark.parametrize("augmentation", [{"augment": True}, {"random_erasing": 0.5}, {"mixup": {"mixup_alpha": 1.0}}])
def test_augmented_training_split_stays_live(tmp_path: Path, small_teacher_checkpoint: Path, augmentation: dict):
    cache = TeacherLogitCache(None)
    model, _ = run(tmp_path, small_teacher_checkpoint, [cache], **augmentation)
    assert cache.hits == []
    assert model.datamodule.train_set.teacher_logits is None
    assert model.datamodule.val_set.teacher_logits is not None
