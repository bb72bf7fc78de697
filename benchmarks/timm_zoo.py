"""Which timm models the project prunes, reloads, exports and trains: every step, model by model (issue 16).

    python benchmarks/timm_zoo.py                          # the zoo below, about 30 minutes on 2 CPU cores
    python benchmarks/timm_zoo.py --models resnet18 vit_tiny_patch16_224
    python benchmarks/timm_zoo.py --ignore-unprunable --models mixnet_s levit_128s   # keep what breaks, prune the rest

Each model (random weights, ``in_chans=1``, 10 classes, 64x64 inputs) runs in its own process, step by step:

- ``tp alone``: torch-pruning's own ``MetaPruner`` (L1, 25% of channels, attention heads kept whole), the
  reference: what the library itself can prune;
- ``l1`` / ``taylor``: :func:`distill.pruning.prune_student` to 60% of the parameters (``taylor`` on two
  random batches); a refusal must leave the model exactly as it was (``refused, unchanged``);
- ``reload``: the l1-pruned student saved with :func:`students.save_student` and loaded in a fresh process by
  :func:`students.load_student`, its logits compared bit for bit;
- ``onnx``: ``distill.export.export`` of that file (dynamic batch, ONNX Runtime's logits on a batch of 3 within
  1e-4 of PyTorch's);
- ``train``: two optimizer steps of the pruned student in a Lightning ``Trainer``, distilled from the unpruned
  model.

The table gives each step's outcome and the last row counts them; each refusal's or failure's message follows.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).parents[1]

#: (family, timm name): CNNs, mobile nets, grouped convolutions, ViTs, hybrids, and some torch-pruning refuses.
ZOO = [
    ("cnn", "resnet18"),
    ("cnn", "resnet50d"),
    ("cnn", "densenet121"),
    ("cnn", "dla34"),
    ("cnn", "cspresnet50"),
    ("cnn", "repvgg_a0"),
    ("mobile", "mobilenetv2_050"),
    ("mobile", "mobilenetv3_small_050"),
    ("mobile", "efficientnet_b0"),
    ("mobile", "mnasnet_small"),
    ("mobile", "lcnet_050"),
    ("mobile", "ghostnet_100"),
    ("mobile", "tinynet_e"),
    ("mobile", "mixnet_s"),
    ("mobile", "rexnet_100"),
    ("grouped", "regnetx_002"),
    ("grouped", "regnety_002"),
    ("grouped", "resnext26ts"),
    ("grouped", "seresnext26d_32x4d"),
    ("vit", "vit_tiny_patch16_224"),
    ("vit", "deit_tiny_patch16_224"),
    ("hybrid", "mobilevit_xxs"),
    ("hybrid", "mobilevitv2_050"),
    ("hybrid", "convnext_atto"),
    ("hybrid", "convnextv2_atto"),
    ("hybrid", "edgenext_xx_small"),
    ("hybrid", "levit_128s"),
    ("hybrid", "efficientvit_m0"),
    ("hybrid", "fastvit_t8"),
    ("hybrid", "coatnet_nano_rw_224"),
]
#: Models whose input size is part of the architecture (position embeddings, attention biases).
SIZED = ("vit_", "deit_", "levit_", "efficientvit_m", "coatnet_")
STEPS = ["tp alone", "l1", "taylor", "reload", "onnx", "train"]
SIDE = 64


def build(name: str):
    from students import create_student

    kwargs = {"img_size": SIDE} if name.startswith(SIZED) else {}
    return create_student(f"timm/{name}", num_classes=10, in_chans=1, model_kwargs=kwargs).eval()


def short(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:160]


def tp_alone(model, x) -> str:
    """torch-pruning's MetaPruner by itself (the reference), heads kept whole, attention sizes synced after."""
    import torch
    import torch_pruning as tp

    from distill.pruning.surgery import GRAPH_TIMEOUT_S, _classifier, _sync_attention, _time_limit, attention_heads

    model = copy.deepcopy(model)
    with _time_limit(GRAPH_TIMEOUT_S, "graph timeout"), torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.25,
            ignored_layers=[_classifier(model)], num_heads=attention_heads(model),
        )  # fmt: skip
        pruner.step()
    _sync_attention(model)
    with torch.no_grad():
        model(x)
    return "ok"


def one(name: str, out: Path, ignore_unprunable: bool = False) -> None:
    """Run every step on ``name``, writing the outcomes to ``out`` (JSON) after each; ``ignore_unprunable``: prune
    with ``PruningPolicy(ignore_unprunable=True)``, keeping the layers a refusal names."""
    import torch

    from distill.profile import count_params
    from distill.pruning import PruningPolicy, prune_student

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    result: dict[str, str] = {}

    def save() -> None:
        out.write_text(json.dumps(result))

    model = build(name)
    params = count_params(model)
    result["params"] = f"{params / 1e6:.2f}M"
    x = torch.randn(1, 1, SIDE, SIDE)
    save()
    try:
        result["tp alone"] = tp_alone(model, x)
    except Exception as err:  # noqa: BLE001 - the reference fails in any way
        result["tp alone"] = "fails: " + short(err)
    save()
    data = [(torch.randn(8, 1, SIDE, SIDE), torch.randint(0, 10, (8,))) for _ in range(2)]
    pruned = None
    for criterion in ("l1", "taylor"):
        student = copy.deepcopy(model)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        start = time.perf_counter()
        try:
            policy = PruningPolicy(importance=criterion, ignore_unprunable=ignore_unprunable)
            report = prune_student(student, x, policy, target_params=int(0.6 * params), data=data)
            kept = f", {len(report.kept_layers)} layers kept" if report.kept_layers else ""
            result[criterion] = f"ok, {report.params_after / params:.0%}{kept} ({time.perf_counter() - start:.0f} s)"
            pruned = pruned or student
        except ValueError as err:
            after = student.state_dict()
            same = after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
            result[criterion] = ("refused, unchanged: " if same else "refused, CHANGED: ") + str(err)
        except Exception as err:  # noqa: BLE001
            result[criterion] = "FAILS: " + short(err)
        save()
    if pruned is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        from students import save_student

        path = Path(tmp) / "student.pt"
        save_student(pruned, path, [1, SIDE, SIDE])
        check = torch.randn(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.save(pruned(check), Path(tmp) / "logits.pt")
        torch.save(check, Path(tmp) / "check.pt")
        code = (
            "import sys, torch; from students import load_student; m = load_student(sys.argv[1]); "
            "x = torch.load(sys.argv[2]); y = torch.load(sys.argv[3])\n"
            "with torch.no_grad(): print('bit-exact' if torch.equal(m(x), y) else 'differs')"
        )
        child = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(path), str(Path(tmp) / "check.pt"),
                                str(Path(tmp) / "logits.pt")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        lines = (child.stdout + child.stderr).strip().splitlines()
        result["reload"] = (lines[-1] if lines else "no output")[:200]
        save()
        try:
            from distill.export import export

            diff = export(str(path), onnx=str(Path(tmp) / "student.onnx"))["onnx"]
            result["onnx"] = f"ok, {diff:.0e}"
        except Exception as err:  # noqa: BLE001
            result["onnx"] = "FAILS: " + short(err)
        save()
    try:
        result["train"] = train_two_steps(pruned, model)
    except Exception as err:  # noqa: BLE001
        result["train"] = "FAILS: " + short(err)
    save()


def train_two_steps(student, teacher) -> str:
    import torch
    from pytorch_lightning import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from distill.module import DistillModule

    images = torch.randn(16, 1, SIDE, SIDE)
    data = DataLoader(TensorDataset(images, torch.randint(0, 10, (16,))), batch_size=8)
    module = DistillModule(student=student.train(), teacher=copy.deepcopy(teacher), lr=1e-3)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, data)
    moved = any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters(), strict=True))
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    return f"ok, loss {loss:.2f}" if moved else "weights did not move"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="timm names (default: the zoo)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument(
        "--graph-timeout",
        type=float,
        default=60,
        help="seconds torch-pruning may trace a graph (distill.pruning.surgery.GRAPH_TIMEOUT_S)",
    )
    kept = "prune with PruningPolicy(ignore_unprunable=True): the layers a refusal names kept whole, the rest pruned"
    parser.add_argument("--ignore-unprunable", action="store_true", help=kept)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import timm

    unknown = [n for n in args.models or [] if not timm.is_model(n)]
    if unknown:
        parser.error(f"not timm models: {', '.join(unknown)} (see timm.list_models())")
    if args.one:
        from distill.pruning import surgery

        surgery.GRAPH_TIMEOUT_S = args.graph_timeout
        one(args.one, args.json, args.ignore_unprunable)
        return
    from distill.report import markdown_table

    families = dict((n, f) for f, n in ZOO)
    rows, notes, counts = [], [], dict.fromkeys(STEPS, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or [n for _, n in ZOO]:
            out = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            try:
                subprocess.run([sys.executable, __file__, "--one", name, "--json", str(out),
                                "--graph-timeout", str(args.graph_timeout)]
                               + ["--ignore-unprunable"] * args.ignore_unprunable, timeout=args.timeout,
                               capture_output=True, check=False, cwd=ROOT)  # fmt: skip
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            result = json.loads(out.read_text()) if out.is_file() else {}
            done = [s for s in STEPS if s in result]
            if timed_out and len(done) < len(STEPS):
                result[STEPS[len(done)]] = f"did not finish in {args.timeout:g} s"
            counts = {s: counts[s] + result.get(s, "").startswith(("ok", "bit-exact")) for s in STEPS}
            cells = [result.get(s, "-") for s in STEPS]
            for step, cell in zip(STEPS, cells, strict=True):  # a refusal or failure: its message below the table
                if ": " in cell and not cell.startswith("ok"):
                    notes.append(f"- {name}, {step}: {cell}")
            rows.append([families.get(name, "-"), name, result.get("params", "-")]
                        + [cell.split(": ")[0] for cell in cells] + [f"{time.perf_counter() - start:.0f}"])  # fmt: skip
            print(f"{name}: {result}", file=sys.stderr, flush=True)
    total = len(rows)
    rows.append(["", f"**{total} models**", ""] + [f"**{counts[s]}/{total}**" for s in STEPS] + [""])
    header = ["family", "model", "params", *STEPS, "s"]
    print(markdown_table(header, "lll" + "l" * len(STEPS) + "r", rows))
    print("\n".join(["", *notes]))


if __name__ == "__main__":
    main()
