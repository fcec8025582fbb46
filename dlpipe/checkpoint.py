"""Crash-safe resume state for training: dlpipe's own checkpoint format.

A train stage keeps its resume state in a backup folder of the run folder
(``backup/``, or ``backup-<stage>/`` when a spec has several train stages). Each save
is one *snapshot*, a folder named ``ckpt-000007`` (a sequence number, newest last)::

    backup/
      ckpt-000006/            the previous good snapshot, kept until a newer one is safe
      ckpt-000007/
        weights.weights.h5    keras.Model.save_weights: the model and its optimizers
        rng.npz               the state of the model's random generators (dropout, ...)
        <extra>.npz           weights snapshots of resumable callbacks (best weights)
        state.json            epoch, history, callback state, and a SHA-256 per file

How a snapshot is written, so that a kill at any moment leaves either the old or the
new snapshot whole and never a torn one:

1. every file is written into a temporary folder ``.tmp-ckpt-000007-<pid>``, flushed
   and ``fsync``-ed; ``state.json``, written last, lists each file's size and hash;
2. the folder is renamed to ``ckpt-000007`` (atomic on POSIX) and the parent folder
   is ``fsync``-ed;
3. only then are snapshots older than the previous one removed.

Reading checks everything: the format version, the epoch against the spec's epochs,
every file's size and hash. A damaged snapshot is never overwritten and never
skipped in silence: :class:`DamagedBackup` names the file, the epoch it held and the
choices (``--restart``, or ``--resume-older`` to continue from the older good one).

Nothing here touches private Keras state: weights and optimizer variables go through
``save_weights``/``load_weights``, random-generator states through ``Variable.assign``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError

FORMAT = 1
STATE_FILE = "state.json"
_NAME = re.compile(r"^ckpt-(\d{6,})$")


class DamagedBackup(DlpipeError):
    """The newest resume snapshot cannot be used; nothing was overwritten."""


class WriteFailed(DlpipeError):
    """A checkpoint could not be written (a full disk, a read-only folder); the
    previous one is intact."""

    exit_code = 1


# --------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it
    over ``path``. A failure or a kill leaves ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix (Keras checks that weight files end in .weights.h5).
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with signals_deferred():
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError | RuntimeError) and write_error_reason(exc):
            raise WriteFailed(
                f"could not write {path}: {write_error_reason(exc)}; the previous "
                "version of the file is intact"
            ) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.

    A checkpoint write interrupted half-way is harmless (it is never renamed into
    place), but finishing it costs milliseconds and saves the epoch it holds. Only the
    main thread can set handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    for signum in (int(signal.SIGINT), int(signal.SIGTERM)):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, lambda s, _f: received.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for got in received[:1]:
            handler = previous[got]
            if callable(handler):
                handler(got, None)
            elif handler == signal.SIG_DFL and got == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), got)


def write_error_reason(exc: BaseException) -> str | None:
    """The plain reason a write failed (``"no space left on device"``), or ``None``
    when ``exc`` is not a failed write. h5py reports a full disk as a
    ``RuntimeError`` whose text carries ``errno = 28``."""
    import errno

    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reasons = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EIO: "input/output error",
    }
    if code in reasons:
        return reasons[code]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return None


# --------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A verified snapshot: its folder and its state."""

    folder: Path
    state: dict[str, Any]

    @property
    def epoch(self) -> int:
        """Epochs completed when it was written (``fit``'s ``initial_epoch``)."""
        return int(self.state["epoch"])

    @property
    def done(self) -> bool:
        """Training had finished: later stages may use these weights as they are."""
        return bool(self.state.get("done"))

    def file(self, name: str) -> Path:
        return self.folder / name


@dataclass
class BackupFolder:
    """The snapshots of one train stage, newest last."""

    folder: Path
    keep: int = 2
    #: Written by :meth:`save`; the state of the latest snapshot on disk.
    latest: Snapshot | None = field(default=None, init=False)

    def names(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir()
                 if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def _next_name(self) -> str:
        names = self.names()
        last = int(_NAME.match(names[-1].name).group(1)) if names else 0  # type: ignore[union-attr]
        return f"ckpt-{last + 1:06d}"

    def save(self, state: dict[str, Any], write_files: Callable[[Path], None]) -> Snapshot:
        """Write a new snapshot: ``write_files(folder)`` writes its files, then
        ``state`` (plus the format, the time and each file's hash) is added."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self._next_name()
        tmp = self.folder / f".tmp-{name}-{os.getpid()}"
        try:
            with signals_deferred():
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                write_files(tmp)
                files = {}
                for path in sorted(tmp.iterdir()):
                    fsync_file(path)
                    files[path.name] = {"size": path.stat().st_size, "sha256": sha256(path)}
                full = {**state, "format": FORMAT, "saved_at": time.time(), "files": files}
                (tmp / STATE_FILE).write_text(json.dumps(full, indent=1), encoding="utf-8")
                fsync_file(tmp / STATE_FILE)
                fsync_dir(tmp)
                final = self.folder / name
                os.rename(tmp, final)
                fsync_dir(self.folder)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = write_error_reason(exc) if isinstance(exc, OSError | RuntimeError) else None
            if reason:
                kept = f"the previous snapshot ({self.latest.folder}, epoch {self.latest.epoch}) is intact" if self.latest else "no earlier snapshot exists"
                raise WriteFailed(
                    f"could not write a resume snapshot in {self.folder}: {reason}; {kept}. "
                    "Free some space and re-run the same command to resume"
                ) from exc
            raise
        self.latest = Snapshot(final, full)
        self._prune()
        return self.latest

    def _prune(self) -> None:
        for old in self.names()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(".tmp-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    def verify(self, folder: Path, epochs: int) -> Snapshot:
        """Read and check one snapshot; raise ``ValueError`` saying what is wrong."""
        state_path = folder / STATE_FILE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{state_path} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{state_path} is unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{state_path} does not hold a mapping")
        if state.get("format") != FORMAT:
            raise ValueError(f"{state_path} has format {state.get('format')!r}, expected {FORMAT}")
        epoch = state.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= epochs:
            raise ValueError(
                f"{state_path} says epoch {epoch!r}, which is not between 0 and the "
                f"{epochs} epochs this spec trains"
            )
        files = state.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"{state_path} lists no files")
        for name, info in files.items():
            path = folder / name
            if not path.is_file():
                raise ValueError(f"{path} (epoch {epoch}) is missing")
            size = path.stat().st_size
            if not isinstance(info, dict) or size != info.get("size"):
                raise ValueError(
                    f"{path} (epoch {epoch}) has {size} bytes, expected {info.get('size') if isinstance(info, dict) else '?'}"
                )
            if sha256(path) != info.get("sha256"):
                raise ValueError(f"{path} (epoch {epoch}) does not match its checksum")
        return Snapshot(folder, state)

    def load(self, epochs: int, *, older: bool = False) -> Snapshot | None:
        """The newest good snapshot, or ``None`` when there is none at all.

        A damaged newest snapshot raises :class:`DamagedBackup`, unless ``older`` is
        set: then it is moved aside (``damaged-ckpt-...``, never deleted) and the next
        good one is used.
        """
        names = self.names()
        stale = [p for p in self.folder.glob("*") if p.is_file() and p.name in (
            "latest.weights.h5", "training_metadata.json")] if self.folder.is_dir() else []
        if not names and stale:
            raise DamagedBackup(
                f"{self.folder} holds a backup in the format of an older dlpipe "
                f"({', '.join(p.name for p in stale)}), which this version cannot resume "
                "reliably.\n    Re-run with --restart to start over (the old backup is kept "
                "aside)."
            )
        problems: list[str] = []
        for i, folder in enumerate(reversed(names)):
            try:
                snapshot = self.verify(folder, epochs)
            except ValueError as exc:
                problems.append(str(exc))
                if older:
                    aside = folder.with_name(f"damaged-{folder.name}")
                    os.rename(folder, aside)
                    print(f"train: set aside the damaged backup {folder} (now {aside.name})")
                    continue
                good = self._first_good(list(reversed(names))[i + 1:], epochs)
                choice = (
                    f"re-run with --resume-older to continue from the older good backup "
                    f"{good.folder} (epoch {good.epoch}), or with --restart to start over"
                    if good else "re-run with --restart to start over (the damaged backup is kept aside)"
                )
                raise DamagedBackup(
                    f"cannot resume: the backup {exc}.\n"
                    "    Nothing was overwritten. " + choice[0].upper() + choice[1:] + "."
                ) from None
            self.latest = snapshot
            return snapshot
        if problems:
            raise DamagedBackup(
                "cannot resume: every backup is damaged:\n    " + "\n    ".join(problems)
                + "\n    Re-run with --restart to start over."
            )
        return None

    def _first_good(self, folders: list[Path], epochs: int) -> Snapshot | None:
        for folder in folders:
            try:
                return self.verify(folder, epochs)
            except ValueError:
                continue
        return None

    def set_aside(self, why: str) -> Path | None:
        """Move the whole folder out of the way (``--restart``); nothing is deleted
        except an earlier set-aside copy with the same reason."""
        if not self.folder.exists():
            return None
        aside = self.folder.with_name(f"{self.folder.name}.{why}")
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(self.folder, aside)
        return aside

    def discard(self) -> None:
        """Remove every snapshot (the run finished; nothing is left to resume)."""
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Model state <-> files (Keras imported lazily)
# --------------------------------------------------------------------------------------


def random_state_variables(model: Any) -> list[Any]:
    """Variables of ``model`` that are not weights: the states of its random
    generators (dropout, noise layers). ``save_weights`` does not store them."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def write_model_state(model: Any, folder: Path) -> None:
    import keras
    import numpy as np

    model.save_weights(str(folder / "weights.weights.h5"))
    rng = [keras.ops.convert_to_numpy(v) for v in random_state_variables(model)]
    np.savez(folder / "rng.npz", *rng)


def read_model_state(model: Any, snapshot: Snapshot) -> None:
    """Load weights and optimizer state (the optimizers must be built) and the
    random generators' state."""
    import numpy as np

    model.load_weights(str(snapshot.file("weights.weights.h5")))
    rng_path = snapshot.file("rng.npz")
    variables = random_state_variables(model)
    if rng_path.is_file():
        with np.load(rng_path) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(values) == len(variables) and all(
            tuple(v.shape) == a.shape for v, a in zip(variables, values, strict=True)
        ):
            for var, value in zip(variables, values, strict=True):
                var.assign(value)


def write_weights_npz(path: Path, weights: list[Any]) -> None:
    import numpy as np

    np.savez(path, *weights)


def read_weights_npz(path: Path) -> list[Any]:
    import numpy as np

    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]
