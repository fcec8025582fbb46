"""The tracking store's health: SQLite file checks, the store lock, MLflow's HTTP
settings, and what a store failure means.

A SQLite file that is empty or not SQLite is refused (:func:`check_store_file`): MLflow
would silently start a new store over it. A failure is reported as what it is
(:func:`describe_failure`): the server cannot be reached, no space left on the device,
the database file is unwritable or was removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from dlpipe import paths
from dlpipe.errors import DlpipeError

#: MLflow's HTTP settings while the sidecar first reaches a tracking server, and for
#: the last write after a failure: one retry and 4 s per request (about 10 s in all)
#: instead of MLflow's default of minutes of retries.
_BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "4",
}

#: MLflow's HTTP settings for the writes during a run, unless the environment sets
#: them: 4 retries over about 30 s ride out a server restart, and a server that is
#: gone fails the run then, not after MLflow's default of 7 retries over minutes
#: (meant for rate-limited hosted servers) and 120 s per request.
_RUN_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

#: What to do about each kind of store failure (see :func:`describe_failure`). Only a
#: store that cannot be found or reached is a matter of fixing the URI.
_HINTS = {
    "connect": "start the tracking server or fix tracking.uri / MLFLOW_TRACKING_URI, "
    "or run with --no-track",
    "uri": "fix tracking.uri / MLFLOW_TRACKING_URI, or run with --no-track",
    "space": "free some space there and run again, or run with --no-track",
    "access": "make it writable and run again, or run with --no-track",
    "removed": "run again to track in a new store, or run with --no-track",
    "damaged": "",  # the message says what to do
    "store": "run again, or run with --no-track",
}

#: The first bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


class StoreDamaged(DlpipeError):
    """The SQLite store file is empty or not SQLite; the message says what to do."""


def check_store_file(uri: str) -> None:
    """Refuse a SQLite store file that is empty (0 bytes) or not an SQLite database.

    MLflow would create a new, empty store over an empty file without a word, and the
    runs it held would be gone for good; over another file it fails obscurely.
    """
    db = paths.sqlite_file(uri)
    if db is None:
        return
    problem = _store_file_problem(db)
    if problem is None:
        return
    backups = _backups(db)
    copy = f" (cp {backups[0]} {db})" if backups else ""
    raise StoreDamaged(
        f"the tracking store {db} {problem}; dlpipe will not start a new store in its place.\n"
        f"    Restore it from a backup if you have one{copy}, or move it aside to start a "
        f"new store (mv {db} {db}.damaged), or run with --no-track"
    )


def _store_file_problem(db: Path) -> str | None:
    try:
        with open(db, "rb") as handle:
            head = handle.read(len(_SQLITE_HEADER))
    except OSError:  # missing: a new store; unreadable: MLflow says so
        return None
    if not head:
        # SQLite may keep a new database's pages in its journal or write-ahead log
        # until they are copied into the file; it recovers them from there.
        for suffix in ("-journal", "-wal"):
            side = db.with_name(db.name + suffix)
            if side.is_file() and side.stat().st_size > 0:
                return None
        return "is empty (0 bytes)"
    if head != _SQLITE_HEADER:
        return "is not an SQLite database (damaged or overwritten)"
    return None


def _backups(db: Path) -> list[Path]:
    """Good SQLite files beside ``db`` named like copies of it, newest first."""
    found = []
    for path in db.parent.glob(db.name + "?*"):
        if path.name.endswith(("-journal", "-wal", "-shm", ".lock")):
            continue
        if path.is_file() and _store_file_problem(path) is None and path.stat().st_size:
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


_CONNECTION_ERRORS = {
    "ConnectionError", "ConnectTimeout", "ConnectTimeoutError", "NewConnectionError",
    "NameResolutionError", "MaxRetryError", "ProtocolError", "gaierror",
}


def describe_failure(exc: BaseException, uri: str, connecting: bool = False) -> tuple[str, str]:
    """A store error as ``(kind, what happened)``: the kind picks the advice
    (:data:`_HINTS`), the text names the server, file or path in a line."""
    if isinstance(exc, StoreDamaged):
        return "damaged", str(exc)
    chain = _causes(exc)
    db = paths.sqlite_file(uri)
    sqlite_errors = [e for e in chain if type(e).__module__ == "sqlite3"]
    reason = str(sqlite_errors[0]) if sqlite_errors else None
    text = " ".join(str(e) for e in chain).lower()
    os_errors = [e for e in chain if isinstance(e, OSError) and e.errno is not None]
    space = next((e for e in os_errors if e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    if space is not None or "database or disk is full" in text or "no space left" in text:
        path = getattr(space, "filename", None) or db or uri
        why = f" ({reason})" if reason else ""
        return "space", f"no space left on device for {path}{why}"
    if db is not None and not connecting and not db.exists():
        return "removed", (
            f"the store file {db} was removed during the run; what this run logged is lost"
        )
    denied = next((e for e in os_errors if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)), None)
    if denied is not None or "readonly database" in text or "unable to open database" in text:
        path = getattr(denied, "filename", None) or db or uri
        why = reason or (denied.strerror if denied is not None else None) or "not writable"
        return "access", f"cannot write to {path} ({why})"
    if any(isinstance(e, (ConnectionError, TimeoutError)) for e in chain) or any(
        c.__name__ in _CONNECTION_ERRORS for e in chain for c in type(e).__mro__
    ):
        strerrors = [e.strerror for e in os_errors if e.strerror]
        why = strerrors[-1] if strerrors else str(chain[-1]) or "timed out"
        return "connect", f"cannot reach the tracking server ({why.lower()})"
    lines = (reason or str(exc)).strip().splitlines()
    summary = f"{type(exc).__name__}: {lines[0][:500] if lines else '(no message)'}"
    if connecting:
        return "uri", f"cannot open the tracking store: {summary}"
    return "store", summary


def failure_message(uri: str, kind: str, text: str) -> str:
    """The error a store failure fails the run with: what happened, and what to do."""
    hint = _HINTS.get(kind, "")
    return f"MLflow tracking failed ({uri}): {text}" + (f"\n    {hint}" if hint else "")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock next to a SQLite store while it may be initialised."""
    db = paths.sqlite_file(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_store_file_now(uri: str) -> None:
    """:func:`check_store_file` before the sidecar starts, to fail at once. (The sidecar
    checks again, under the store lock, right before MLflow opens the file.)"""
    try:
        check_store_file(uri)
    except StoreDamaged:
        with _store_lock(uri):  # another run may be creating the store right now
            check_store_file(uri)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri
