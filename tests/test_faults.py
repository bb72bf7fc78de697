"""The fault suite: bad input to every ``distill`` command gets one clear line and changes nothing on disk.

Each row of ``FAULTS`` is a command a user (or a hostile user) might type, with the words its one
``distill: error:`` line must hold. Before the suite, :func:`earlier_runs` makes finished runs of
``fit``, ``sweep``, ``prune-distill`` and ``export`` in one folder; every faulty command points at
those runs (or beside them), and afterwards every file there must be byte-identical and no file or
folder may have appeared. The commands run in this process through ``distill.cli.main``, as the
console script does.

Run ``python tests/test_faults.py`` to print the table: each bad input, its exit status, the line it
got, and whether the earlier runs were left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import RunsCode, fmnist, tiny_kd_recipe, tiny_trainer

from distill import DistillModule
from distill.cli import main
from distill.export import export
from distill.prune_distill import prune_distill
from distill.recipes import relocate
from distill.sweep import sweep
from students import StudentNet, create_student, save_student


@dataclass(frozen=True)
class Fault:
    """A bad command: its arguments and what it must say (in both, ``{name}`` stands for a path of
    :func:`earlier_runs`)."""

    kind: str
    args: tuple[str, ...]
    expect: str


FIT = ("fit", "--config", "{recipe}")
TEACHER = (*FIT, "--model.teacher.init_args.checkpoint")
RESUME = ("--config", "{recipe}", "--ckpt_path")
SWEEP = ("sweep", "--recipe", "{recipe}", "--run_dir", "{runs}/sweep", "--baseline", "false")
NEW = ("--run_dir", "{runs}/new")
NEW_SWEEP = ("sweep", "--recipe", "{recipe}", *NEW)
STORAGE, OVERRIDE = (*NEW_SWEEP, "--storage"), (*NEW_SWEEP, "--overrides")
SWEEP_T2 = (*SWEEP, "--temperatures", "[2]")
PRUNE = ("prune-distill", "--recipe", "{inputs}/prune.yaml", "--target_params", "3000", "--initial_epochs", "1")
PRUNE += ("--epochs_per_round", "1", "--rounds", "1", "--final_epochs", "0", "--baseline", "false")
PRUNE += ("--export_onnx", "false", "--latency_runtime", "torch-cpu", "--run_dir", "{runs}/prune")
NEW_PRUNE = (*PRUNE[:-2], *NEW)
BEST = "{runs}/prune/best_student.ckpt"  # the student prune-distill wrote
SPLIT_SEED = ("--data.init_args.split_seed", "1")
OTHER_TEACHER = ("--model.teacher.init_args.checkpoint", "{runs}/fit/best.ckpt")  # the KD student as a teacher
NO_TEACHER = ("--config", "{inputs}/no_teacher.yaml", "--ckpt_path")  # the recipe without its teacher
PREDICT = (*RESUME, "{runs}/fit/best.ckpt", "--trainer.callbacks+=distill.PredictionWriter", "--trainer.callbacks.path")
EXPORT = ("export", BEST)
TO_ONNX = ("--onnx", "{runs}/export/student.onnx")
TO_INT8 = ("--int8", "{runs}/export/student.int8.onnx")
INT8 = (*TO_INT8, "--recipe", "{recipe}")
QUICK = ("quickstart", "--run_dir", "{runs}/quickstart", "--teacher_model", "test_resnet")
QUICK += ("--teacher_config", "{repo}/configs/fmnist/teacher.yaml", "--kd_config", "{repo}/configs/fmnist/kd.yaml")

FAULTS = [
    Fault("mistyped command", ("prune-distil", *NEW), "unknown command 'prune-distil': did you mean prune-distill?"),
    # ---- distill fit: the config file
    Fault("config file missing", ("fit", "--config", "{inputs}/missing.yaml"), "File does not exist"),
    Fault("config YAML syntax error", ("fit", "--config", "{inputs}/syntax.yaml"), "did not find expected"),
    Fault("config with a python tag", ("fit", "--config", "{inputs}/tag.yaml"), "could not determine a constructor"),
    Fault("config empty", ("fit", "--config", "{inputs}/empty.yaml"), "must map options to values (e.g. 'trainer:"),
    Fault("config a YAML list", ("fit", "--config", "{inputs}/list.yaml"), "this one is '- trainer - model'"),
    Fault("unknown option", (*FIT, "--trainer.max_epoch", "3"), "max_epoch"),
    Fault("option of the wrong type", (*FIT, "--trainer.max_epochs", "abc"), "Given value: abc"),
    # ---- distill fit: model settings
    Fault("negative learning rate", (*FIT, "--model.lr", "-1"), "need finite lr > 0"),
    Fault("unknown optimizer", (*FIT, "--model.optimizer", "lion"), "lion"),
    Fault("KD temperature 0", (*FIT, "--model.loss.init_args.temperature", "0"), "temperature must be a number > 0"),
    Fault("KD alpha outside [0, 1]", (*FIT, "--model.loss.init_args.alpha", "1.5"), "alpha must be in [0, 1]"),
    Fault("StudentNet width NaN", (*FIT, "--model.student.init_args.width_mult", ".nan"), "finite number > 0, got nan"),
    Fault("student in_chans against the data", (*FIT, "--model.student.init_args.in_chans", "3"), "contradicts"),
    Fault("a loss of another signature", (*FIT, "--model.loss", "torch.nn.CrossEntropyLoss"), "must be called as"),
    Fault("mixup alpha -1", (*FIT, "--model.mixup", "{{mixup_alpha: -1}}"), "mixup: mixup_alpha must be a finite"),
    Fault("mixup that mixes nothing", (*FIT, "--model.mixup", "{{mixup_alpha: 0}}"), "this mixes nothing"),
    Fault("mixup cutmix_minmax of one", (*FIT, "--model.mixup", "{{cutmix_minmax: [0.1]}}"), "must be [min, max]"),
    Fault("mixup unknown mode", (*FIT, "--model.mixup", "{{mode: bogus}}"), "mode must be batch, pair or elem"),
    Fault(
        "mixup with an odd batch size",
        (*FIT, "--model.mixup", "{{mixup_alpha: 0.8}}", "--data.init_args.batch_size", "33"),
        "give an even batch_size, got 33",
    ),
    # ---- distill fit: the Trainer and callbacks
    Fault("trainer setting Lightning refuses", (*FIT, "--trainer.gradient_clip_algorithm", "bogus"), "bogus"),
    Fault("validation every 0 epochs", (*FIT, "--trainer.check_val_every_n_epoch", "0"), "check_val_every_n_epoch=0"),
    Fault(
        "fit of 0 epochs beside a run", (*FIT, "--trainer.max_epochs", "0"), "max_epochs=0: distill fit would run no"
    ),
    Fault("fit of 0 validation batches", (*FIT, "--trainer.limit_val_batches", "0"), "nothing logs val/acc, which"),
    Fault(
        "fit of 0 batches",
        (*FIT, "--trainer.limit_train_batches", "0.0"),
        "limit_train_batches=0: distill fit would run",
    ),
    Fault(
        "test of 0 batches",
        ("test", *RESUME, "{runs}/fit/best.ckpt", "--trainer.limit_test_batches", "0"),
        "limit_test_batches=0: distill test would run no batch",
    ),
    Fault(
        "EMA that never moves", (*FIT, "--trainer.callbacks+=distill.EMA", "--trainer.callbacks.decay", "1"), "[0, 1)"
    ),
    Fault("gradients accumulated over 0 batches", (*FIT, "--trainer.accumulate_grad_batches", "0"), "accumulate"),
    Fault("pruning callback, unknown layer", ("fit", "--config", "{inputs}/prune_layer.yaml"), "names no layer"),
    Fault("pruning callback, unreachable target", ("fit", "--config", "{inputs}/prune_target.yaml"), "cannot be met"),
    Fault("logit cache folder is a file", ("fit", "--config", "{inputs}/cache_file.yaml"), "is a file, not a folder"),
    # ---- distill fit: data
    Fault("negative DataLoader workers", (*FIT, "--data.init_args.num_workers", "-1"), "num_workers must be >= 0"),
    Fault("val_size 1.5", (*FIT, "--data.init_args.val_size", "1.5"), "val_size must be a number of images"),
    Fault("val_size larger than the data", (*FIT, "--data.init_args.val_size", "70000"), "leaves no training"),
    Fault(
        "data root that does not exist",
        (*FIT, "--data.init_args.root", "{inputs}/nowhere", "--data.init_args.download", "false"),
        "not found",
    ),
    Fault("batch size 0", (*FIT, "--data.init_args.batch_size", "0"), "batch sizes must be >= 1"),
    # ---- distill fit: the teacher
    Fault("teacher checkpoint missing", (*TEACHER, "{inputs}/no.ckpt"), "exist"),
    Fault("teacher a text file", (*TEACHER, "{inputs}/text.ckpt"), "not a readable"),
    Fault("teacher random bytes", (*TEACHER, "{inputs}/random.ckpt"), "readable"),
    Fault("teacher a malicious pickle", (*TEACHER, "{inputs}/evil.ckpt"), "unsafe"),
    Fault("teacher of 5 classes", (*TEACHER, "{inputs}/classes5.ckpt"), "5 classes"),
    Fault("teacher of 3 channels", (*TEACHER, "{inputs}/rgb.ckpt"), "in_chans=1"),
    Fault(
        "teacher's EMA from a distill checkpoint",
        (*TEACHER, "{inputs}/classes5.ckpt", "--model.teacher.init_args.use_ema", "true"),
        "written by distill and holds one student: drop use_ema",
    ),
    Fault("teacher a state_dict without its name", (*TEACHER, "{inputs}/state_dict.pt"), "pass name="),
    # ---- distill fit/test: --ckpt_path
    Fault("resume from a missing file", ("fit", *RESUME, "{inputs}/no.ckpt"), "does not exist"),
    Fault("resume from a text file", ("fit", *RESUME, "{inputs}/text.ckpt"), "not a readable torch file"),
    Fault("resume from random bytes", ("fit", *RESUME, "{inputs}/random.ckpt"), "not a readable torch file"),
    Fault("resume from a malicious pickle", ("fit", *RESUME, "{inputs}/evil.ckpt"), "refused as unsafe"),
    Fault("resume another architecture", ("fit", *RESUME, "{inputs}/resnet.ckpt"), "holds the student timm/"),
    Fault("resume with another lr", ("fit", *RESUME, "{runs}/fit/last.ckpt", "--model.lr", "0.5"), "lr=0.5"),
    Fault("resume on another split", ("fit", *RESUME, "{runs}/fit/last.ckpt", *SPLIT_SEED), "data split_seed=0, but"),
    Fault(
        "resume with another batch size",
        ("fit", *RESUME, "{runs}/fit/last.ckpt", "--data.init_args.batch_size", "16"),
        "trained with data batch_size=32, but this run's data has batch_size=16: the rest of the run would learn",
    ),
    Fault(
        "resume with augmentation",
        (
            "fit",
            *RESUME,
            "{runs}/fit/last.ckpt",
            "--data.init_args.augment",
            "true",
            "--data.init_args.random_erasing",
            "0.5",
        ),
        "data augment=False, random_erasing=0.0, but this run's data has augment=True, random_erasing=0.5",
    ),
    Fault("resume last on another split", ("fit", *RESUME, "last", "--data.init_args.val_size", "600"), "val_size=500"),
    Fault(
        "fit into a prune-distill run", (*FIT, "--trainer.default_root_dir", "{runs}/prune"), "holds a prune-distill"
    ),
    Fault(
        "resume at another temperature",
        ("fit", *RESUME, "last", "--model.loss.init_args.temperature", "8"),
        "temperature': 8",
    ),
    Fault(
        "resume with mixup added",
        ("fit", *RESUME, "{runs}/fit/last.ckpt", "--model.mixup", "{{mixup_alpha: 0.8}}"),
        "change half-way",
    ),
    Fault("resume with another teacher", ("fit", *RESUME, "{runs}/fit/last.ckpt", *OTHER_TEACHER), "another teacher"),
    Fault(
        "resume naming teacher_checkpoint",
        ("fit", *RESUME, "{runs}/fit/last.ckpt", "--model.teacher", "null", "--model.teacher_checkpoint", BEST),
        "which LightningCLI takes over this run's",
    ),
    Fault("resume last without the teacher", ("fit", *NO_TEACHER, "last"), "but this run has no teacher"),
    Fault("validate another dataset's run", ("validate", *NO_TEACHER, "{inputs}/five.ckpt"), "holds the student"),
    Fault("resume from a student file", ("fit", *RESUME, BEST), "student's weights"),
    Fault(
        "test a student file",
        ("test", *RESUME, BEST),
        "to test it, --model.student students.load_student "
        "--model.student.init_args.path " + BEST + " (without --ckpt_path)",
    ),
    Fault("test another architecture", ("test", *RESUME, "{inputs}/resnet.ckpt"), "timm"),
    Fault(
        "export at a size beyond memory",
        (*EXPORT, *TO_ONNX, "--input_size", "1000000000"),
        "out of memory (3552.7 PiB asked for)",
    ),
    Fault(
        "predict another run's checkpoint, no logger",
        ("predict", *RESUME, "{runs}/prune/initial/best.ckpt", "--trainer.logger", "false"),
        "predictions.csv would be replaced",
    ),
    Fault(  # each allocation fits, but not all of them: the kernel killed the process without a word
        "export at a size its checks cannot hold",
        (*EXPORT, *TO_ONNX, "--input_size", "50000"),
        "checking the exported student on 3 images holds at least ",
    ),
    Fault(
        "export at an overflowing size", (*EXPORT, *TO_ONNX, "--input_size", "100000000000"), "larger than any memory"
    ),
    Fault("test another run's checkpoint", ("test", *RESUME, "{runs}/prune/initial/best.ckpt"), "is not the run in"),
    Fault(
        "predict another run's checkpoint",
        ("predict", *RESUME, "{runs}/prune/initial/best.ckpt"),
        "a file of their own",
    ),
    Fault(
        "test a student another run wrote",
        ("test", *FIT[1:], "--model.student", "students.load_student", "--model.student.path", BEST),
        "metrics.csv would take rows of another model: give this test a log folder of its own (the logger's "
        "save_dir, e.g. --trainer.logger.init_args.save_dir {runs}/prune/best_student_test)",
    ),
    Fault(
        "predict a student another run wrote",
        ("predict", *FIT[1:], "--model.student", "students.load_student", "--model.student.path", BEST),
        "predictions.csv would be replaced by another model's",
    ),
    Fault(  # a recipe copied with its log folder changed, its ModelCheckpoint's not: the first run's last.ckpt went
        "fit into another run's checkpoint folder",
        (*FIT, "--trainer.default_root_dir", "{runs}/copy", "--trainer.logger.init_args.save_dir", "{runs}/copy"),
        "ModelCheckpoint would write into",
    ),
    Fault(  # the same, its checkpoints nested in the first run's folder as Lightning nests them (<log_dir>/checkpoints)
        "fit into a checkpoint folder inside another run's",
        ("fit", "--config", "{inputs}/nested.yaml"),
        "ModelCheckpoint would write into",
    ),
    Fault(  # resumed to train on, logging elsewhere: its checkpoints, not its config and metrics, would move on
        "resume into another folder, checkpoints left",
        (
            "fit",
            *RESUME,
            "last",
            "--trainer.default_root_dir",
            "{runs}/more",
            "--trainer.logger.init_args.save_dir",
            "{runs}/more",
            "--trainer.max_epochs",
            "2",
        ),
        "ModelCheckpoint would write into",
    ),
    Fault("test without a checkpoint", ("test", *FIT[1:]), "without --ckpt_path would test the recipe's student"),
    Fault(
        "test last of a run never fitted",
        ("test", "--config", "{inputs}/never.yaml", "--ckpt_path", "last"),
        "no last checkpoint",
    ),
    Fault(
        "predictions onto their checkpoint",
        ("predict", *PREDICT, "{runs}/fit/best.ckpt"),
        "is the checkpoint predicted",
    ),
    Fault("predictions into a folder", ("predict", *PREDICT, "{runs}/fit"), "is a folder: give a file name, e.g. "),
    Fault(  # a typo for predictions.csv beside it
        "predictions onto the run's config",
        ("predict", *PREDICT, "{runs}/fit/config.yaml"),
        "config.yaml' is a run's record; it would be overwritten: give another file name, e.g. {runs}/fit/predictions",
    ),
    Fault("validate with val_size 1.5", ("validate", *FIT[1:], "--data.init_args.val_size", "1.5"), "1.5"),
    # ---- distill sweep
    Fault("sweep temperature 0", (*SWEEP, "--temperatures", "[0]"), "Temperatures must be finite and > 0"),
    Fault("sweep empty grid", (*SWEEP, "--temperatures", "[]"), "The grid is empty"),
    Fault("sweep alpha 1.5", (*SWEEP_T2, "--alphas", "[1.5]"), "Alphas must be in [0, 1]"),
    Fault("sweep no seeds", (*SWEEP_T2, "--seeds", "[]"), "The grid is empty"),
    Fault(
        "prune-distill of 0 batches",
        (*NEW_PRUNE, "--overrides", "{{trainer: {{limit_train_batches: 0}}}}"),
        "limit_train_batches=0: distill fit",
    ),
    Fault(
        "sweep of a recipe's outside loss",
        (*NEW_SWEEP, "--overrides", "{{model: {{loss: evil.module.KDLoss}}}}"),
        "evil",
    ),
    Fault("sweep storage in memory", (*STORAGE, "sqlite://"), "an in-memory sweep storage is lost when the worker"),
    Fault("sweep in another storage", (*SWEEP_T2, "--storage", "sqlite:///{runs}/other.db"), "stored in its sweep.db"),
    Fault("sweep of an emptied sweep.db", (*SWEEP_T2[:4], "{inputs}/emptied_sweep", *SWEEP_T2[5:]), "missing or empty"),
    Fault(
        "sweep of a damaged sweep.db", (*SWEEP_T2[:4], "{inputs}/damaged_sweep", *SWEEP_T2[5:]), "is damaged (SQLite"
    ),
    Fault("prune-distill without its state.json", (*PRUNE[:-1], "{inputs}/stateless_prune"), "without its state.json"),
    Fault("prune-distill state.json a list", (*PRUNE[:-1], "{inputs}/corrupt_prune"), "is not the state of a prune"),
    Fault(
        "sweep of a recipe with distill fit's teacher shorthand",
        (*NEW_SWEEP, "--overrides", "{{model: {{teacher: null, teacher_checkpoint: t.ckpt}}}}"),
        "sets no model.teacher; its model.teacher_checkpoint 't.ckpt' is distill fit's shorthand, which jobs do not",
    ),
    Fault("sweep of 0 epochs", (*NEW_SWEEP, "--overrides", "{{trainer: {{max_epochs: 0}}}}"), "max_epochs=0"),
    Fault("sweep of a fit recipe as --config", ("sweep", "--config", "{recipe}", *NEW), "to this command as --recipe"),
    Fault("sweep seed -1", (*SWEEP_T2, "--seeds", "[-1]"), "Seeds must be integers in [0, 2**32), got [-1]"),
    Fault("sweep variant's model a number", (*NEW_SWEEP, "--variants", "{{a: {{model: 5}}}}"), "must be a mapping"),
    Fault("sweep changed grid", (*SWEEP, "--temperatures", "[2, 8]"), "created for the grid"),
    Fault(
        "sweep changed recipe",
        (*SWEEP_T2, "--overrides", "{{trainer: {{max_epochs: 2}}}}"),
        "created for another recipe",
    ),
    Fault("sweep recipe a folder", ("sweep", "--recipe", "{inputs}", *NEW), "is a folder: give its YAML file"),
    Fault("sweep recipe missing", ("sweep", "--recipe", "{inputs}/none.yaml", *NEW), "not found"),
    Fault("sweep recipe YAML error", ("sweep", "--recipe", "{inputs}/syntax.yaml", *NEW), "YAML"),
    Fault("sweep recipe a list", ("sweep", "--recipe", "{inputs}/list.yaml", *NEW), "not a mapping"),
    Fault(
        "sweep teacher a text file",
        ("sweep", "--recipe", "{inputs}/text_teacher.yaml", *NEW),
        "not a readable torch file",
    ),
    Fault(
        "sweep storage unreachable",
        (*STORAGE, "postgresql://nobody@127.0.0.1:1/sweeps"),
        "Cannot open the sweep storage",
    ),
    Fault(
        "sweep overrides break the Trainer",
        (*OVERRIDE, "{{trainer: {{gradient_clip_algorithm: bogus}}}}"),
        "bogus",
    ),
    Fault(
        "sweep without validation",
        (*OVERRIDE, "{{trainer: {{limit_val_batches: 0}}}}"),
        "nothing logs val/acc, which the ModelCheckpoint",
    ),
    Fault("sweep overrides model: 5", (*OVERRIDE, "{{model: 5}}"), "needs 'model' as a mapping"),
    Fault(
        "sweep storage not SQLite",
        (*STORAGE, "sqlite:///{runs}/fit/best.ckpt"),
        "not an SQLite database",
    ),
    Fault("sweep max_trials 0", (*SWEEP_T2, "--max_trials", "0"), "max_trials >= 1"),
    Fault("sweep heartbeat 0", (*SWEEP_T2, "--heartbeat_interval", "0"), "heartbeat_interval"),
    # ---- distill prune-distill
    Fault("prune target above the student", (*PRUNE[:4], "10000000", *PRUNE[5:]), "is not below the student's"),
    Fault("prune target unreachable", (*NEW_PRUNE[:4], "10", *NEW_PRUNE[5:]), "target 10 parameters cannot"),
    Fault("prune unknown schedule", (*PRUNE, "--schedule", "linear"), "Unknown schedule 'linear'"),
    Fault("prune unknown criterion", (*PRUNE, "--importance", "weights"), "Unknown importance criterion"),
    Fault(
        "prune two targets",
        (*PRUNE, "--target_macs", "1000"),
        "keep one (--target_macs null keeps target_params, or --target_params null keeps target_macs)",
    ),
    Fault(
        "prune target_latency 1.5", (*PRUNE[:3], "--target_latency", "1.5", *PRUNE[5:]), "need 0 < target_latency < 1"
    ),
    Fault("prune ratio 1.5", (*PRUNE, "--ratio", "1.5"), "need 0 < ratio < 1"),
    Fault("prune too few rounds", (*PRUNE, "--schedule", "fixed", "--max_rounds", "2"), "needs at least"),
    Fault(
        "prune fine-tune lr -1",
        (*NEW_PRUNE, "--lr_rewinding", "false", "--finetune_lr", "-1"),
        "finite finetune_lr > 0",
    ),
    Fault("prune seed -1", (*NEW_PRUNE, "--seed", "-1"), "0 <= seed < 2**31"),
    Fault("prune round_to 0", (*NEW_PRUNE, "--round_to", "0"), "round_to >= 1"),
    Fault("prune min_fraction -1", (*NEW_PRUNE, "--min_fraction", "-1"), "0 <= min_fraction < 1"),
    Fault(
        "prune start of 5 classes", (*NEW_PRUNE, "--student_checkpoint", "{inputs}/classes5.ckpt"), "predicts 5 classes"
    ),
    Fault("prune unknown layer", (*PRUNE, "--ignored_layers", "[cnn.9]"), "ignored_layers names no layer"),
    Fault("prune start missing", (*PRUNE, "--student_checkpoint", "{inputs}/no.ckpt"), "does not exist"),
    Fault("prune start a text file", (*PRUNE, "--student_checkpoint", "{inputs}/text.ckpt"), "not a readable"),
    Fault(
        "prune resumed, other settings",
        (*PRUNE[:-2], "--epochs_per_round", "2", "--run_dir", "{runs}/prune"),
        "other settings (epochs_per_round changed)",
    ),
    Fault("prune resumed, recipe edited", PRUNE, "the content of the recipe"),
    # ---- distill export
    Fault("export nothing", EXPORT, "Nothing to export"),
    Fault("export onto its checkpoint", (*EXPORT, "--onnx", BEST), "would be overwritten"),
    Fault(
        "export onto another checkpoint",
        (*EXPORT, "--onnx", "{runs}/prune/initial/best.ckpt"),
        "best.ckpt' is a checkpoint; it would be overwritten: give another file name, e.g. {runs}/prune/initial/",
    ),
    Fault(
        "export TorchScript onto its checkpoint",
        (*EXPORT, "--torchscript", "{runs}/prune/./best_student.ckpt"),
        "would be overwritten",
    ),
    Fault("export into a folder", (*EXPORT, "--onnx", "{runs}/export"), "a folder"),
    Fault(
        "export two formats, one file",
        (*EXPORT, "--onnx", "{runs}/export/a", "--torchscript", "{runs}/export/a"),
        "name the same file",
    ),
    Fault("export input size 0", (*EXPORT, *TO_ONNX, "--input_size", "0"), "input_size must be a positive"),
    Fault("export input too small", (*EXPORT, *TO_ONNX, "--input_size", "2"), "cannot run on (1, 2, 2) inputs"),
    Fault("export a text file", ("export", "{inputs}/text.ckpt", *TO_ONNX), "readable"),
    Fault("export a plain state_dict", ("export", "{inputs}/state_dict.pt", *TO_ONNX), "records no student_spec"),
    Fault("export a crafted spec", ("export", "{inputs}/spec_str.ckpt", *TO_ONNX), "not {{name, kwargs}}"),
    Fault("export a spec with unknown arguments", ("export", "{inputs}/spec_kwargs.ckpt", *TO_ONNX), "cannot be built"),
    Fault("export a crafted pruned layout", ("export", "{inputs}/layout.ckpt", *TO_ONNX), "a layer 'nope' the arch"),
    Fault("export a crafted input shape", ("export", "{inputs}/shape.ckpt", *TO_ONNX), "not [channels, height, width]"),
    Fault(
        "export into a new folder, check fails",
        (*EXPORT, "--onnx", "{runs}/newdir/student.onnx", "--torchscript", "{runs}/newdir/x/student.pt", "--atol", "0"),
        "differ",
    ),
    Fault("export pt2 onto its checkpoint", (*EXPORT, "--pt2", BEST), "would be overwritten"),
    Fault("export int8 onto its recipe", (*EXPORT, "--int8", "{recipe}", "--recipe", "{recipe}"), "int8 calibrates on"),
    Fault(
        "export onto a pipe", (*EXPORT, "--onnx", "{inputs}/pipe"), "is not a regular file (a device, pipe or socket)"
    ),
    Fault("export int8 without a recipe", (*EXPORT, *TO_INT8), "no config.yaml beside"),
    Fault("export int8, recipe missing", (*EXPORT, *TO_INT8, "--recipe", "{inputs}/missing.yaml"), "not found"),
    Fault("export int8, unknown calibration", (*EXPORT, *INT8, "--calibration_method", "mse"), "calibration_method"),
    Fault("export int8, unknown format", (*EXPORT, *INT8, "--quant_format", "int4"), "Unknown quant_format"),
    Fault("export int8 options without int8", (*EXPORT, *TO_ONNX, "--recipe", "{recipe}"), "only apply to int8"),
    Fault("export int8, int4 activations", (*EXPORT, *INT8, "--activations", "int4"), "activations must be"),
    Fault("export int8, 0 calibration images", (*EXPORT, *INT8, "--calibration_images", "0"), "calibration_images"),
    Fault(
        "export int8 at another size",
        (*EXPORT, *INT8, "--input_size", "32"),
        "inputs: export it at that data's size (--input_size 28)",
    ),
    Fault("prune latency on a TPU", (*NEW_PRUNE, "--latency_runtime", "tpu"), "Unknown latency_runtime"),
    Fault("prune-distill over fit runs", (*PRUNE[:-1], "{runs}"), "holds fit runs that no prune-distill made (fit/"),
    Fault("prune with every layer ignored", (*NEW_PRUNE, "--ignored_layers", "[cnn]"), "no layer is left to prune"),
    Fault(
        "prune to negative parameters",
        (*PRUNE[:3], "--target_params=-5", *PRUNE[5:-2], *NEW),
        "target_params must be a count >= 1",
    ),
    Fault(
        "prune latency on more threads than CPUs", (*NEW_PRUNE, "--latency_threads", "100000"), "more than this machine"
    ),
    Fault("prune latency at batch 0", (*NEW_PRUNE, "--latency_batch_size", "0"), "latency_batch_size must be"),
    Fault(
        "prune latency in 0 rounds", (*NEW_PRUNE, "--latency_rounds", "0"), "latency_rounds must be a whole number >= 1"
    ),
    Fault(
        "prune latency at a batch beyond memory",
        (*PRUNE[:3], "--target_latency", "0.8", *PRUNE[5:-2], *NEW, "--latency_batch_size", "1000000000000000"),
        "out of memory (2785.3 PiB asked for): lower the batch size",
    ),
    # ---- distill quickstart: refused before the teacher trains
    Fault("quickstart 0 rounds", (*QUICK, "--prune_rounds", "0"), "rounds >= 1"),
    Fault("quickstart latency in 0 rounds", (*QUICK, "--latency_rounds", "0"), "latency_rounds must be a whole number"),
    Fault("quickstart unknown criterion", (*QUICK, "--importance", "weights"), "Unknown importance criterion"),
    Fault("quickstart unknown teacher", (*QUICK, "--teacher_model", "resnet9000"), "is not a timm model"),
    Fault(
        "quickstart teacher recipe without a student",
        (*QUICK, "--teacher_config", "{inputs}/no_student.yaml"),
        "must train a timm teacher",
    ),
    Fault("quickstart 0 teacher epochs", (*QUICK, "--teacher_epochs", "0"), "need teacher_epochs >= 1"),
    Fault("quickstart target above the student", (*QUICK, "--target_latency_ms", "1e6"), "is not below the student"),
    Fault("quickstart target unreachable", (*QUICK, "--target_latency_ms", "1e-6"), "ms cannot be met"),
    Fault("quickstart target fraction 1", (*QUICK, "--target_latency", "1.0"), "need 0 < target_latency < 1"),
    Fault("quickstart two targets", (*QUICK, "--target_latency", "0.5", "--target_latency_ms", "1"), "not both"),
    Fault(
        "prune-distill recipe with an unknown option",
        (*NEW_PRUNE, "--overrides", "{{trainer: {{max_epoch: 1}}}}"),
        "prune.yaml with its overrides: Group 'trainer' does not accept option 'max_epoch' (options: distill fit",
    ),
    Fault("quickstart no training batch", (*QUICK, "--limit_train_batches", "0"), "need limit_train_batches > 0"),
    # ---- a job's run_dir: a file, or another command's run (their files share names: summary.md, cache/)
    Fault("prune-distill run_dir a file", (*PRUNE[:-1], "{inputs}/teacher.ckpt"), "is a file, not a folder"),
    Fault("prune-distill into a sweep's folder", (*PRUNE[:-1], "{runs}/sweep"), "holds a sweep run (sweep.yaml)"),
    Fault("sweep into prune-distill's folder", (*NEW_SWEEP[:-1], "{runs}/prune"), "holds a prune-distill run"),
    Fault(
        "quickstart over fit runs of its own", ("quickstart", "--run_dir", "{runs}", *QUICK[3:]), "no quickstart made"
    ),
    Fault("quickstart into a fit's folder", ("quickstart", "--run_dir", "{runs}/fit", *QUICK[3:]), "holds a fit run"),
]


def earlier_runs(root: Path) -> dict[str, str]:
    """Finished runs of fit, sweep, prune-distill and export under ``root/runs``; bad inputs under ``root/inputs``."""
    inputs, runs = root / "inputs", root / "runs"
    inputs.mkdir(parents=True)
    torch.manual_seed(0)
    teacher = DistillModule(create_student("test_studentnet", base=2, num_classes=10, in_chans=1, num_pools=3))
    trainer = tiny_trainer(inputs, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(teacher, datamodule=fmnist())
    trainer.save_checkpoint(inputs / "teacher.ckpt")

    recipe = tiny_kd_recipe(inputs, inputs / "teacher.ckpt")
    cfg = relocate(yaml.safe_load(recipe.read_text()), runs / "fit")
    recipe.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(recipe)])
    sweep(str(recipe), temperatures=[2.0], baseline=False, run_dir=str(runs / "sweep"), cache_teacher_logits=False)
    shutil.copy(recipe, inputs / "prune.yaml")
    prune_distill(
        str(inputs / "prune.yaml"),
        target_params=3000,
        initial_epochs=1,
        epochs_per_round=1,
        rounds=1,
        final_epochs=0,
        baseline=False,
        export_onnx=False,
        latency_runtime="torch-cpu",
        run_dir=str(runs / "prune"),
    )
    export(str(runs / "prune" / "best_student.ckpt"), onnx=str(runs / "export" / "student.onnx"))

    edited = yaml.safe_load(recipe.read_text())  # prune-distill's recipe file, edited after its run
    edited["model"]["loss"]["init_args"]["temperature"] = 20.0
    (inputs / "prune.yaml").write_text(yaml.safe_dump(edited))
    text_teacher = yaml.safe_load(recipe.read_text())
    text_teacher["model"]["teacher"]["init_args"]["checkpoint"] = str(inputs / "text.ckpt")
    (inputs / "text_teacher.yaml").write_text(yaml.safe_dump(text_teacher))
    (inputs / "syntax.yaml").write_text("trainer: {max_epochs: 1\nmodel: [\n")
    (inputs / "tag.yaml").write_text(f'!!python/object/apply:os.system ["touch {inputs / "code_ran"}"]\n')
    (inputs / "empty.yaml").write_text("")
    (inputs / "list.yaml").write_text("- trainer\n- model\n")
    (inputs / "text.ckpt").write_text("a checkpoint, surely\n")
    os.mkfifo(inputs / "pipe")  # not a regular file: an output there would replace it (as root, /dev/null too)
    (inputs / "random.ckpt").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    torch.save({"state_dict": {}, "payload": RunsCode(str(inputs / "code_ran"))}, inputs / "evil.ckpt")
    save_student(StudentNet(base=2, num_classes=5, in_chans=1, num_pools=3), inputs / "classes5.ckpt")
    save_student(StudentNet(base=2, num_classes=10, in_chans=3, num_pools=3), inputs / "rgb.ckpt")
    resnet = DistillModule(create_student("timm/test_resnet", num_classes=10, in_chans=1, small_input=True))
    trainer = tiny_trainer(inputs, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(resnet, datamodule=fmnist())
    trainer.save_checkpoint(inputs / "resnet.ckpt")  # a training checkpoint of another architecture
    torch.save(StudentNet(base=2, num_classes=10, in_chans=1).state_dict(), inputs / "state_dict.pt")
    student = StudentNet(base=2, num_classes=10, in_chans=1, num_pools=3)
    spec = {"name": "studentnet", "kwargs": {"bogus": 1}}
    torch.save({"hyper_parameters": {"student_spec": "x"}, "state_dict": {}}, inputs / "spec_str.ckpt")
    torch.save({"hyper_parameters": {"student_spec": spec}, "state_dict": {}}, inputs / "spec_kwargs.ckpt")
    shaped = torch.load(save_student(student, inputs / "shape.ckpt", input_shape=[1, 28, 28]), weights_only=True)
    torch.save({**shaped, "input_shape": ["1", 28, -28]}, inputs / "shape.ckpt")  # as another tool might record it
    crafted = create_student("timm/test_resnet", num_classes=10, in_chans=1, small_input=True)
    crafted.model_spec |= {"pruned": True, "layout": {"nope": {"out_channels": 3}}}
    save_student(crafted, inputs / "layout.ckpt", input_shape=[1, 28, 28])
    for name, callback in {
        "prune_layer": {
            "class_path": "distill.pruning.ChannelPruning",
            "init_args": {"schedule": {"ratio": 0.1}, "ignored_layers": ["cnn.9"]},
        },
        "prune_target": {
            "class_path": "distill.pruning.ChannelPruning",
            "init_args": {"schedule": {"target_params": 10}, "min_fraction": 0.5},
        },
        "cache_file": {"class_path": "distill.cache.TeacherLogitCache", "init_args": {"cache_dir": str(recipe)}},
    }.items():
        with_callback = yaml.safe_load(recipe.read_text())
        with_callback["trainer"]["callbacks"].append(callback)
        (inputs / f"{name}.yaml").write_text(yaml.safe_dump(with_callback))
    for name, state in (("stateless_prune", None), ("corrupt_prune", "[1, 2, 3]")):  # a run's record lost
        (inputs / name).mkdir()
        shutil.copy(runs / "prune" / "prune_distill.yaml", inputs / name)
        if state is not None:
            (inputs / name / "state.json").write_text(state)
    (inputs / "emptied_sweep").mkdir()
    shutil.copy(runs / "sweep" / "sweep.yaml", inputs / "emptied_sweep")
    (inputs / "emptied_sweep" / "sweep.db").write_bytes(b"")
    (inputs / "damaged_sweep").mkdir()
    shutil.copy(runs / "sweep" / "sweep.yaml", inputs / "damaged_sweep")
    db = bytearray((runs / "sweep" / "sweep.db").read_bytes())
    db[4096:8192] = bytes((b * 7 + 13) % 256 for b in db[4096:8192])  # a page scrambled: optuna failed mid-query
    (inputs / "damaged_sweep" / "sweep.db").write_bytes(bytes(db))
    (inputs / "never.yaml").write_text(yaml.safe_dump(relocate(yaml.safe_load(recipe.read_text()), runs / "never")))
    nested = relocate(yaml.safe_load(recipe.read_text()), runs / "nested")
    for callback in nested["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(runs / "fit" / "checkpoints")
    (inputs / "nested.yaml").write_text(yaml.safe_dump(nested))
    no_teacher = yaml.safe_load(recipe.read_text())
    del no_teacher["model"]["teacher"]
    (inputs / "no_teacher.yaml").write_text(yaml.safe_dump(no_teacher))
    five = StudentNet(base=2, num_classes=5, in_chans=1, num_pools=3)  # a run of a 5-class dataset, as written
    save_student(five, inputs / "teacher5.ckpt")
    other = torch.load(runs / "fit" / "best.ckpt", weights_only=True)
    other["hyper_parameters"] |= {"student_spec": five.model_spec, "teacher_checkpoint": str(inputs / "teacher5.ckpt")}
    other["state_dict"] = {f"student.{k}": v for k, v in five.state_dict().items()}
    torch.save(other, inputs / "five.ckpt")
    no_student = yaml.safe_load((Path(__file__).parents[1] / "configs" / "fmnist" / "teacher.yaml").read_text())
    del no_student["model"]["student"]
    (inputs / "no_student.yaml").write_text(yaml.safe_dump(no_student))
    return {"inputs": str(inputs), "runs": str(runs), "recipe": str(recipe), "repo": str(Path(__file__).parents[1])}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
    }


def run_fault(fault: Fault, paths: dict[str, str]) -> tuple[int, str]:
    """Run the command as the console script would; its exit status and everything it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([a.format(**paths) for a in fault.args])
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distill: error:")]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return earlier_runs(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("fault", FAULTS, ids=[f.kind for f in FAULTS])
def test_bad_input_gets_one_line_and_changes_nothing(fault: Fault, paths: dict[str, str]):
    root = Path(paths["runs"]).parent  # the earlier runs and the inputs
    before = snapshot(root)
    status, stderr = run_fault(fault, paths)
    assert status == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert fault.expect.format(**paths) in lines[0], lines[0]
    assert snapshot(root) == before  # every file byte for byte, nothing new (no code ran, nothing was written)


def test_the_suite_covers_every_command_with_forty_kinds():
    commands = {f.args[0] for f in FAULTS}
    assert commands >= {"fit", "validate", "test", "sweep", "prune-distill", "export", "quickstart"}
    assert len({f.kind for f in FAULTS}) == len(FAULTS) >= 40


if __name__ == "__main__":  # print the table
    import logging
    import tempfile

    logging.disable(logging.WARNING)  # Lightning's progress notes: the table is the output

    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            found = earlier_runs(Path(tmp))
        print("| bad input | command | exit | the line it got | earlier runs untouched |")
        print("|---|---|---:|---|---|")
        for fault in FAULTS:
            before = snapshot(Path(tmp))
            status, stderr = run_fault(fault, found)
            same = snapshot(Path(tmp)) == before
            line = " / ".join(error_lines(stderr)) or stderr.strip().splitlines()[-1:] or "(nothing)"
            line = str(line).replace(found["inputs"], "<inputs>").replace(found["runs"], "<runs>").replace("|", "\\|")
            print(f"| {fault.kind} | `distill {fault.args[0]}` | {status} | {line} | {'yes' if same else 'NO'} |")
