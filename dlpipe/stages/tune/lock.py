"""Counting a study's trials, under a lock, so that workers share the budget exactly.

The lock is held from "is a trial still needed?" until that trial exists in the
storage; whoever takes it next counts that trial. It lives where the study lives, so
that it holds for every process that can reach the study:

=================  ===============================================================
PostgreSQL         a transaction-level advisory lock (``pg_advisory_xact_lock``) on
                   a connection of its own: every worker on every machine; the
                   server drops it when a holder's connection dies
SQLite             a lock row in the database file (table :data:`LOCK_TABLE`),
                   taken in a ``BEGIN IMMEDIATE`` transaction: every process that
                   opens the file
anything else      a file lock under the dlpipe home: exact on this machine only
=================  ===============================================================

SQLite locks the whole file for writing: a write transaction held open on one
connection while Optuna creates the trial on another would wait on itself. So the row
is the lock, and each ``BEGIN IMMEDIATE`` transaction only takes or frees it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from dlpipe import paths

#: The SQLite table of study locks: one row per study while a process holds its lock.
LOCK_TABLE = "dlpipe_study_locks"

#: Seconds after which a SQLite lock row of a process on another machine counts as
#: abandoned (a process on this machine that is gone frees it at once). The lock is
#: held for the moment it takes to create a trial; this only bounds a crash.
SQLITE_LEASE_S = 120.0

#: Seconds PostgreSQL lets the lock's transaction sit idle before it ends the session,
#: which frees the lock of a worker whose machine vanished without closing the
#: connection.
PG_IDLE_TIMEOUT_S = 120


@dataclass
class Tally:
    counted: int = 0
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: set[int] = field(default_factory=set)


def tally(trials: list[Any]) -> Tally:
    """Count the study's trials. A failed trial that was retried (its worker died) or
    that Ctrl+C interrupted does not use up the budget; its retry does."""
    t = Tally()
    for trial in trials:
        t.retried.update(trial.system_attrs.get("retry_history", []))
    for trial in trials:
        if trial.state == TrialState.FAIL and (
            trial.number in t.retried or trial.user_attrs.get("dlpipe.interrupted")
        ):
            continue
        t.counted += 1
        if trial.state == TrialState.WAITING:
            t.waiting += 1
        elif trial.state == TrialState.RUNNING:
            t.running += 1
        elif trial.state == TrialState.COMPLETE:
            t.complete += 1
        elif trial.state == TrialState.PRUNED:
            t.pruned += 1
        elif trial.state == TrialState.FAIL:
            t.failed += 1
    return t


def lock_key(name: str) -> int:
    """The study's advisory-lock key: a signed 64-bit number from its name."""
    digest = hashlib.sha256(f"dlpipe.tune:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class StudyLock:
    """The study's exclusive lock (see the module's docstring for where it lives).

    ``acquire`` blocks until this process holds it and does nothing if it holds it
    already; ``release`` frees it and does nothing if it is free. ``scope`` says for
    which processes it is exact: ``"database"`` or ``"machine"``.
    """

    def __init__(self, url: str, name: str = "") -> None:
        self.url = url
        self.name = name
        self._impl: _Lock = _lock_for(url, name)
        self.scope = self._impl.scope

    def acquire(self) -> None:
        self._impl.acquire()

    def release(self) -> None:
        self._impl.release()

    def close(self) -> None:
        """Release the lock and close its connection."""
        self._impl.release()
        self._impl.close()


class _Lock:
    scope = "database"

    def acquire(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _lock_for(url: str, name: str) -> _Lock:
    if url.startswith("sqlite:"):
        db = paths.sqlite_file(url)
        return _NoLock() if db is None else _SqliteLock(db, name)
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001 - Optuna reports a bad URL when it opens it
        backend = ""
    if backend == "postgresql":
        return _PostgresLock(url, name)
    return _FileLock(url, name)


class _NoLock(_Lock):
    """An in-memory SQLite study: one process only."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class _PostgresLock(_Lock):
    """``pg_advisory_xact_lock`` in a transaction on a connection of its own, ended by
    ``release``. The trial is created meanwhile on Optuna's connections; PostgreSQL
    locks rows, not tables, so nothing waits on the lock but other lockers."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self.key = lock_key(name)
        self.engine = sqlalchemy.create_engine(
            url, pool_size=1, max_overflow=0, pool_pre_ping=True, pool_recycle=1800
        )

        @sqlalchemy.event.listens_for(self.engine, "connect")
        def _session_settings(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(
                f"SET idle_in_transaction_session_timeout = '{PG_IDLE_TIMEOUT_S}s'"
            )
            cursor.close()
            dbapi_connection.commit()

        self._conn: Any = None

    def acquire(self) -> None:
        if self._conn is not None:
            return
        from sqlalchemy import text

        conn = self.engine.connect()
        try:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.commit()  # ends the transaction, and the lock with it
        except Exception:  # noqa: BLE001 - the session is gone: so is its lock
            conn.invalidate()
        finally:
            conn.close()

    def close(self) -> None:
        self.engine.dispose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _SqliteLock(_Lock):
    """A row in :data:`LOCK_TABLE` of the study's SQLite file names the holder."""

    def __init__(self, db: Path, name: str) -> None:
        self.db = db
        self.name = name
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._conn: sqlite3.Connection | None = None
        self._held = False

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.db.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.db, timeout=60, isolation_level=None)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (name TEXT PRIMARY KEY, "
                "owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
                "since REAL NOT NULL)"
            )
            self._conn = conn
        return self._conn

    def _abandoned(self, host: str, pid: int, since: float) -> bool:
        if host == self.host:
            return not _alive(pid)
        return time.time() - since > SQLITE_LEASE_S

    def acquire(self) -> None:
        if self._held:
            return
        conn = self._connect()
        delay = 0.01
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    f"SELECT owner, host, pid, since FROM {LOCK_TABLE} WHERE name = ?",
                    (self.name,),
                ).fetchone()
                if row is None or row[0] == self.owner or self._abandoned(*row[1:]):
                    conn.execute(
                        f"INSERT OR REPLACE INTO {LOCK_TABLE} VALUES (?, ?, ?, ?, ?)",
                        (self.name, self.owner, self.host, os.getpid(), time.time()),
                    )
                    conn.execute("COMMIT")
                    self._held = True
                    return
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        conn = self._connect()
        conn.execute(
            f"DELETE FROM {LOCK_TABLE} WHERE name = ? AND owner = ?", (self.name, self.owner)
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _FileLock(_Lock):
    """Another server database: an exclusive file lock in the dlpipe home."""

    scope = "machine"

    def __init__(self, url: str, name: str) -> None:
        digest = hashlib.sha256(f"{url}\n{name}".encode()).hexdigest()[:16]
        self.path = paths.home() / "locks" / f"study-{digest}.lock"
        self._handle: Any = None

    def acquire(self) -> None:
        if self._handle is not None:
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w")  # noqa: SIM115 - held across calls
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
