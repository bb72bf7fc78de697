"""A job's run directory: the settings it holds, the record of its finished phases, and safe writes.

Jobs (``quickstart``, ``sweep``, ``prune-distill``) resume when run again in the same folder, so a
folder is held to the settings and input files it was started with: other ones are refused before
anything trains, naming what changed. Every result file is written to a partial file and renamed into
place, so a killed job or a reader in another worker never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no file locks
    fcntl = None

__all__ = [
    "IncompleteRun",
    "RunState",
    "atomic_path",
    "atomic_write",
    "changed_settings",
    "check_output",
    "check_run_dir",
    "file_digest",
    "file_lock",
    "hold_run_dir",
    "refuse_changes",
    "release_run_dir",
    "rerooted",
]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (their names and bytes: a teacher in timm's hub layout)."""
    digest = hashlib.sha256()
    files = sorted(f for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if file != Path(path):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A partial file beside ``path`` to write; renamed onto ``path`` only if the block succeeds.

    Readers never see half a file, and a write that fails leaves an existing ``path`` as it was.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")  # unique across hosts
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


#: Files of a run an output must never replace: its checkpoints and its records (a typo in an output path, e.g.
#: ``--onnx run/last.ckpt`` or ``PredictionWriter(path="run/config.yaml")``, replaced them).
RUN_RECORDS = ("config.yaml", "hparams.yaml", "metrics.csv", "state.json", "evaluated.json")
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")


def check_output(path: str | Path, option: str, inputs: dict[str, str | Path | None], example: str) -> None:
    """Refuse an output ``path`` that the rename of :func:`atomic_path` would wrongly replace: a folder (``example``:
    a file name to suggest in it), a device, pipe or socket (as root, ``--onnx /dev/null`` replaced ``/dev/null``
    with a file), one of the command's ``inputs`` (by description: ``{"the checkpoint being exported": path}``),
    which it reads and must not destroy, or a checkpoint or record of a run (:data:`RUN_RECORDS`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option}={str(path)!r} is a folder: give a file name, e.g. {path / example}")
    if path.exists() and not path.is_file():
        raise ValueError(f"{option}={str(path)!r} is not a regular file (a device, pipe or socket): give a file name")
    for what, used in inputs.items():
        if used is not None and path.resolve() == Path(used).resolve():
            raise ValueError(f"{option}={str(path)!r} is {what}; it would be overwritten: give another file name")
    if path.is_file() and (path.suffix in CHECKPOINT_SUFFIXES or path.name in RUN_RECORDS):
        what = "a checkpoint" if path.suffix in CHECKPOINT_SUFFIXES else "a run's record"
        raise ValueError(f"{option}={str(path)!r} is {what}; it would be overwritten: give another file name, e.g. "
                         f"{path.with_name(example)}")  # fmt: skip


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (processes and threads on one machine wait their turn).

    A no-op where the platform has no ``fcntl`` (Windows) or the folder does not exist.
    """
    lock = Path(f"{path}.lock")
    if fcntl is None or not lock.parent.is_dir():
        yield
        return
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a text file beside ``path``, then rename it onto ``path``."""
    with atomic_path(path) as partial, open(partial, "w", newline="") as f:
        write(f)


class IncompleteRun(RuntimeError):
    """A job ended with part of its work unfinished (its report says what); ``distill`` exits with status 3."""

    exit_status = 3


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings whose values differ between a recorded run and this one (a missing one reads as None)."""
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))


_LOCK = ".distill.lock"  # "<pid> <job>" of the process that holds (or last held) a run folder

#: The file each command leaves at the top of its run directory, by which another job's run there is known.
RUN_MARKERS = {"quickstart": "quickstart.json", "sweep": "sweep.yaml", "prune-distill": "prune_distill.yaml",
               "fit": "config.yaml"}  # fmt: skip


def check_run_dir(folder: Path, job: str) -> None:
    """Refuse a ``run_dir`` for ``job`` that is a file, or that holds another command's run: the jobs share file
    names (``summary.md``, ``state.json``, ``cache/``), and one would overwrite the other's. A job's run_dir that holds
    fit runs in its sub-folders, but no run of that job, is refused too: its stages train into such folders."""
    where = "the run folder" if job == "fit" else "run_dir"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{where} {folder} is a file, not a folder: give a folder (it is created if missing)")
    if (folder / _LOCK).exists() and not (folder / _LOCK).is_file():
        raise ValueError(f"{where} {folder}: its {_LOCK} is not a file (jobs lock it): remove it, or use another "
                         f"folder")  # fmt: skip
    for other, marker in RUN_MARKERS.items():
        if other != job and (folder / marker).is_file():
            raise ValueError(
                f"{where} {folder} holds a {other} run ({marker}): {job} would overwrite its files. Use another folder."
            )
    own = job in RUN_MARKERS and ((folder / RUN_MARKERS[job]).is_file() or _holder(folder) in (job, ""))
    fits = sorted(f"{p.parent.name}/" for p in folder.glob("*/config.yaml")) if job != "fit" and not own else []
    if fits:  # e.g. `distill fit` of configs/fmnist/teacher.yaml wrote <run_dir>/teacher/, which quickstart trains into
        raise ValueError(
            f"{where} {folder} holds fit runs that no {job} made ({', '.join(fits)}): {job} would train over them. "
            f"Use another folder."
        )


_HELD: dict[Path, Any] = {}  # the run folders this process holds, and their open lock files


def _holder(folder: Path) -> str | None:
    """The job whose process holds or last held ``folder`` (``""`` from a lock file without one), or None: no lock.

    A job killed before its first record leaves only this file: the job it names resumes there, no other one."""
    lock = folder / _LOCK
    if not lock.is_file():
        return None
    words = lock.read_text(errors="replace").split()
    if (len(words) == 1 and words[0].isdigit()) or not words:  # a pid alone, as written before 2026-12-07: any job's
        return ""
    return words[1] if len(words) == 2 and words[0].isdigit() else "?"  # not a lock of ours: nobody's


def hold_run_dir(folder: Path, job: str) -> None:
    """Create ``folder`` and hold it for this process until :func:`release_run_dir` (or the process ends): a job
    started there by another process is refused, where two of them trained into the same files at once (one
    crashed, the other lost rows of its metrics). Holding a folder this process holds already is a no-op."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if folder in _HELD:
        return
    if fcntl is None:  # no locks on Windows; the file still marks the folder as a job's own (check_run_dir)
        (folder / _LOCK).write_text(f"{os.getpid()} {job}\n")
        return
    handle = open(folder / _LOCK, "a+")  # noqa: SIM115  (open while the folder is held)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid, other = ([*handle.read().split(), "", ""])[:2]  # "<pid> <job>", or "<pid>" from an older version
        handle.close()
        raise ValueError(
            f"run_dir {folder} is in use by another {other or job} process{f' (pid {pid})' if pid else ''}: wait for "
            f"it to end, or use another run_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {job}\n")
    handle.flush()
    _HELD[folder] = handle


def release_run_dir(folder: Path) -> None:
    """Let other processes run jobs in ``folder`` again (see :func:`hold_run_dir`)."""
    handle = _HELD.pop(folder.resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def refuse_changes(folder: Path, job: str, changed: Iterable[str], then: str) -> None:
    """Refuse to resume the ``job`` run in ``folder`` with the ``changed`` settings; ``then``: what rerunning does."""
    changed = list(changed)
    if changed:
        raise ValueError(
            f"{folder} holds a {job} run with other settings ({', '.join(changed)} changed). Use a new run_dir, "
            f"or rerun with the original settings: {then}."
        )


class RunState:
    """``state.json`` of a resumable job: its settings, its inputs and a record per finished phase.

    Args:
        folder: the run directory (created by :meth:`hold`, not before: a refused run writes nothing).
        job: the job's name, for messages.
    """

    #: What stands for the run directory in the paths ``state.json`` records: a folder moved or copied resumes on its
    #: own files.
    HERE = "<run_dir>"

    def __init__(self, folder: Path, job: str) -> None:
        self.folder = folder
        self.job = job
        self.path = folder / "state.json"
        marker = RUN_MARKERS.get(job)
        if not self.path.is_file() and marker is not None and (folder / marker).is_file():
            raise ValueError(f"{folder} holds a {job} run ({marker}) without its state.json: restore the file, or use "
                             f"a new run_dir (a run here would train over that run's files)")  # fmt: skip
        self.state: dict[str, Any] = self._read() if self.path.is_file() else {"phases": {}}

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads(self.path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            state, why = None, f"not JSON: {err}"
        else:
            why = "not a mapping with the finished phases"
        if not (isinstance(state, dict) and isinstance(state.get("phases"), dict)):
            raise ValueError(f"{self.path} is not the state of a {self.job} run ({why}): restore it, or use a new "
                             f"run_dir")  # fmt: skip
        return rerooted(state, self.HERE, str(self.folder.resolve()))

    @property
    def phases(self) -> dict[str, dict[str, Any]]:
        """The records of the finished phases, by key."""
        return self.state["phases"]

    def hold(self, settings: dict[str, Any], inputs: dict[str, Any], compared_as_contents: Iterable[str]) -> None:
        """Record the run's settings and inputs (contents, digests of files it reads); refuse other ones.

        Only a run that trained something is held to its settings: a run that stopped before its first phase
        ended (bad input found late, a crash) starts again with the new ones. ``compared_as_contents`` names
        settings that are paths: their contents, in ``inputs``, are compared instead of their spelling.
        """
        settings = json.loads(json.dumps(settings, default=str))
        skipped = set(compared_as_contents)

        def compared(values: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in values.items() if k not in skipped}

        changed = changed_settings(compared(self.state.get("settings", settings)), compared(settings))
        recorded = self.state.get("inputs", inputs)
        named = {"recipe": "recipe (its settings, overrides included, or its image folder's files)"}
        moved = [
            f"the content of the {named.get(k, k)}" for k in inputs if k != "inputs" and recorded.get(k) != inputs[k]
        ]
        if sorted(recorded.get("inputs", {}).values()) != sorted(inputs.get("inputs", {}).values()):
            before = set(recorded.get("inputs", {}).values())  # by digest: the run may have moved
            other = [path for path, digest in inputs.get("inputs", {}).items() if digest not in before]
            moved.append(f"a file it reads ({', '.join(other or inputs.get('inputs', {}))})")
        trained = any(key != "start" for key in self.phases)  # "start" only copies an input into the run
        if trained:
            refuse_changes(self.folder, self.job, changed, "it then resumes")  # a new option reads as None there
        if trained and moved:
            raise ValueError(
                f"{self.folder} holds a {self.job} run of other inputs ({', '.join(moved)} changed since it "
                f"started): resuming would mix them in one run. Use a new run_dir, or restore the original inputs."
            )
        if changed or moved:
            self.state = {"phases": {}}  # nothing trained yet: start afresh with these settings
        self.state["settings"], self.state["inputs"] = settings, inputs
        hold_run_dir(self.folder, self.job)
        self.save()

    def record(self, key: str, row: dict[str, Any]) -> None:
        """Record a finished phase: a rerun finds it and goes on after it."""
        self.phases[key] = row
        self.save()

    def save(self) -> None:
        state = rerooted(self.state, str(self.folder.resolve()), self.HERE)
        atomic_write(self.path, lambda f: json.dump(state, f, indent=1))


def rerooted(value: Any, old: str, new: str) -> Any:
    """``value`` with each string in it (mapping keys too) that is a path under ``old`` moved under ``new`` (e.g.
    under :attr:`RunState.HERE`, which stands for the run directory in records that move with it)."""
    if isinstance(value, dict):
        return {rerooted(k, old, new): rerooted(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rerooted(v, old, new) for v in value]
    if isinstance(value, str) and value.startswith(old + os.sep):
        return new + value[len(old) :]
    return value
