"""MLflow tracking, as a plugin on the lifecycle hooks.

One MLflow run per pipeline run: the flattened resolved spec as params, every epoch's
metrics, tags with versions and the git commit, and every artifact a stage reports. A
failure marks the run FAILED with the error; an interrupt marks it KILLED.

MLflow runs in a sidecar process. Importing it, opening the store and every write
happen there, in order, on the machine's other core: the training process never imports
MLflow, never waits for the database, and exits without tearing MLflow down.
``after_run`` and ``on_run_error`` wait for the sidecar to finish, so nothing is lost.

The store must answer before the first stage starts (:data:`CONNECT_TIMEOUT_S`): a
tracking server that is down fails the run in seconds, before any training. A store
failure is reported as what it is (the server cannot be reached, no space left on the
device, the database file is unwritable or was removed), and a SQLite file that is
empty or not SQLite is refused: MLflow would silently start a new store over it.

A killed or failed run goes on in the same MLflow run when its spec runs again: the
run folder's ``tracking.json`` (:data:`RUN_FILE`) names the MLflow run until it has
finished, and the next top-level run of the spec reopens it (``dlpipe run --restart``
starts a new one).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import json
import logging
import multiprocessing
import os
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from dlpipe import hookimpl, paths
from dlpipe.checkpoint import atomic_write_text
from dlpipe.errors import DlpipeError, RunStopped

#: The run folder's record of its MLflow run (``{"uri", "run_id", "experiment"}``),
#: kept until the run has finished: a re-run of the spec continues that MLflow run.
RUN_FILE = "tracking.json"

#: Seconds from ``before_run`` within which a tracking server must have answered and
#: created the run; the first stage waits for it, so a server that is down fails the
#: run before any training.
CONNECT_TIMEOUT_S = 15.0

#: The same for a store on this machine (a SQLite file), which cannot be unreachable,
#: only slow: a new store's tables take seconds to create on a busy machine.
LOCAL_CONNECT_TIMEOUT_S = 120.0

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


# --------------------------------------------------------------------------------------
# The store's health: damaged files, and what an error means
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The sidecar: a plain function run in a spawned process
# --------------------------------------------------------------------------------------


def serve(uri: str, requests: Any, replies: Any) -> None:
    """Apply tracking requests in order until ``stop``; report run ids and errors.

    One sidecar serves a run and the runs nested in it (tuning trials). Requests are
    tuples naming a run by a key the training process chose: ``("start", key,
    parent_key, experiment, artifact_location, run_name, tags, params, resume_run_id,
    spec_files)``, ``("attach", key, run_id)`` (log into an existing run and leave it
    open), ``("metrics", key, metrics, step, timestamp_ms)``, ``("artifact", key, path,
    artifact_path)``, ``("model", key, staged_folder, registration)`` (see
    :func:`log_model`), ``("finish", key, status, error, tags)``, ``("exit",)`` (the
    training process is exiting without closing its runs) and ``("stop",)``.

    Replies: ``("started", key, run_id, times_resumed)``, ``("registered", key, name,
    version, alias)``, ``("finished", key, status)``, ``("error", kind, text)`` (see
    :func:`describe_failure`) and ``("stopped",)``. After an error nothing more is
    written, except that ``finish`` still tries, briefly, to mark the run FAILED with
    the error.
    """
    # Ctrl+C reaches the whole process group; the training process decides what the
    # run's status becomes, so the sidecar must outlive the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # MLflow logs each store error with its traceback; the training process reports it
    # in a line instead.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name, value in _RUN_HTTP.items():
        os.environ.setdefault(name, value)
    parent = multiprocessing.parent_process()
    client: Any = None
    runs: dict[str, str] = {}  # key -> MLflow run id
    open_runs: set[str] = set()  # keys this sidecar started and has not finished
    failure: tuple[str, str] | None = None  # (kind, text) of the error that stopped writes
    pending: dict[str, list[Any]] = {}  # metrics are written in batches, at most every 2 s
    last_write = time.monotonic()

    def fail(exc: BaseException, connecting: bool = False) -> None:
        nonlocal failure
        failure = describe_failure(exc, uri, connecting)
        replies.put(("error", *failure))

    def write_metrics() -> None:
        nonlocal last_write
        for key, batch in pending.items():
            if batch and key in runs:
                for i in range(0, len(batch), 900):
                    client.log_batch(runs[key], metrics=batch[i : i + 900])
        pending.clear()
        last_write = time.monotonic()

    def connect() -> Any:
        from mlflow.tracking import MlflowClient

        with _store_lock(uri):  # two processes must not create the tables at once
            check_store_file(uri)
            with _environment(_BOUNDED_HTTP):
                found = MlflowClient(tracking_uri=uri)
                found.search_experiments(max_results=1)
        return found

    def experiment_id(name: str, artifact_location: str) -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = (Path(artifact_location).resolve() / name).as_uri()
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except Exception:  # another process created it first
            return str(client.get_experiment_by_name(name).experiment_id)

    def log_params(run_id: str, params: dict[str, Any], skip: Any = ()) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in skip]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])

    def reopen(run_id: str, experiment: str, tags: dict[str, str], params: dict[str, Any]) -> int | None:
        """Set an earlier segment's run RUNNING again; how often it has now been resumed,
        or ``None`` when it cannot go on (gone, deleted, finished, elsewhere)."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        if run.info.status == "FINISHED" or run.info.lifecycle_stage != "active":
            return None
        if client.get_experiment(run.info.experiment_id).name != experiment:
            return None
        old = run.data.tags
        try:
            count = int(old.get("dlpipe.resumed", "0")) + 1
        except ValueError:
            count = 1
        client.update_run(run_id, status="RUNNING")
        ended = run.info.status + (f": {old['dlpipe.error']}" if "dlpipe.error" in old else "")
        for stale in ("dlpipe.error", "dlpipe.tracking_error"):
            if stale in old:
                client.delete_tag(run_id, stale)
        tags = {**tags, "dlpipe.resumed": str(count), "dlpipe.resumed_after": ended}
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        # MLflow refuses to change a param: log only the new ones (the spec's digest,
        # which names the run folder, covers every param).
        log_params(run_id, params, skip=set(run.data.params))
        return count

    def close_after_failure(key: str, status: str, error: str | None) -> None:
        """The store failed: still try, briefly, to mark the run FAILED with the error,
        so that it does not stay RUNNING where the store can still be written."""
        assert failure is not None
        if key not in open_runs or failure[0] == "removed":
            return
        open_runs.discard(key)
        status = "KILLED" if status == "KILLED" else "FAILED"
        try:
            with _environment(_BOUNDED_HTTP):
                client.set_tag(runs[key], "dlpipe.tracking_error", failure[1][:5000])
                client.set_tag(runs[key], "dlpipe.error", (error or failure[1])[:5000])
                client.set_terminated(runs[key], status)
        except BaseException:  # the store is gone for good: the training process says so
            return
        replies.put(("finished", key, status))

    def close_all(why: str) -> None:
        """The training process went away without closing its runs: leave none RUNNING."""
        if client is None or failure is not None:
            return
        with contextlib.suppress(BaseException):
            for key in open_runs:
                client.set_tag(runs[key], "dlpipe.error", why)
                client.set_terminated(runs[key], "KILLED")

    while True:
        try:
            request = requests.get(timeout=2)
        except queue.Empty:
            if pending and failure is None:
                try:
                    write_metrics()
                except BaseException as exc:
                    fail(exc)
            if parent is not None and not parent.is_alive():
                # The training process died (kill -9, OOM).
                close_all("the training process died")
                return
            continue
        op = request[0]
        if op == "stop":
            replies.put(("stopped",))
            # Everything is written; skip tearing MLflow down (about a second).
            replies.close()
            replies.join_thread()
            os._exit(0)
        if op == "exit":
            close_all("the training process exited without closing the run")
            os._exit(0)
        if failure is not None:
            if op == "finish" and client is not None:
                close_after_failure(request[1], request[2], request[3])
            continue
        key = request[1]
        try:
            if op != "metrics":
                write_metrics()
            if client is None:
                try:
                    client = connect()
                except BaseException as exc:
                    fail(exc, connecting=True)
                    continue
            if op == "start":
                (_, key, parent_key, experiment, artifact_location, run_name, tags, params,
                 resume_id, spec_files) = request
                if parent_key is not None:
                    tags = {**tags, "mlflow.parentRunId": runs[parent_key]}
                resumed = reopen(resume_id, experiment, tags, params) if resume_id else None
                if resumed is None:
                    run_id = client.create_run(
                        experiment_id(experiment, artifact_location), run_name=run_name, tags=tags
                    ).info.run_id
                else:
                    run_id = resume_id
                runs[key] = run_id
                open_runs.add(key)
                replies.put(("started", key, run_id, resumed or 0))
                if resumed is None:  # a resumed run has its params and spec already
                    log_params(run_id, params)
                    for path in spec_files:
                        client.log_artifact(run_id, path, "spec")
            elif op == "attach":
                runs[key] = request[2]
                replies.put(("started", key, request[2], 0))
            elif op == "metrics":
                from mlflow.entities import Metric

                _, key, metrics, step, timestamp = request
                pending.setdefault(key, []).extend(
                    Metric(k, v, timestamp, step or 0) for k, v in metrics.items()
                )
                if time.monotonic() - last_write >= 2.0 or sum(map(len, pending.values())) >= 900:
                    write_metrics()
            elif op == "artifact":
                client.log_artifact(runs[key], request[2], request[3])
            elif op == "model":
                _, key, staged, registration = request
                registered = log_model(client, runs[key], staged, registration)
                if registered is not None:
                    replies.put(("registered", key, *registered))
            elif op == "finish":
                _, key, status, error, tags = request
                from mlflow.entities import RunTag

                tag_items = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
                if error:
                    tag_items.append(RunTag("dlpipe.error", error[:5000]))
                if tag_items:
                    client.log_batch(runs[key], tags=tag_items)
                if key in open_runs:  # an attached run belongs to another process
                    client.set_terminated(runs[key], status)
                    open_runs.discard(key)
                replies.put(("finished", key, status))
        except BaseException as exc:  # reported to the training process
            fail(exc)
            if op == "finish":
                close_after_failure(key, request[2], request[3])


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


class Sidecar:
    """The training process's end of the tracking process: queues, replies, run ids."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.run_ids: dict[str, str] = {}
        #: How often each run was resumed (0: a new run).
        self.resumed: dict[str, int] = {}
        #: The status each finished run has in the store.
        self.finished: dict[str, str] = {}
        #: ``(kind, text)`` of the store's failure, once there is one.
        self.failure: tuple[str, str] | None = None
        self.failure_raised = False
        #: Called once the run with this key exists, with its id and resume count.
        self.announce: dict[str, Callable[[str, int], None]] = {}
        self.started_at = time.monotonic()
        self._keys = itertools.count()
        mp = multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._replies = mp.Queue()
        self._process = mp.Process(
            target=serve, args=(uri, self._requests, self._replies),
            name="dlpipe-mlflow", daemon=True,
        )
        self._process.start()
        self._stopped = False
        # Runs before multiprocessing's own exit handler, which would wait forever for
        # a sidecar that was never stopped (it ignores SIGTERM).
        atexit.register(self._end)

    def new_key(self) -> str:
        return f"run-{next(self._keys)}"

    def _handle(self, reply: Any) -> None:
        if reply[0] == "started":
            _, key, run_id, resumed = reply
            self.run_ids[key] = run_id
            self.resumed[key] = resumed
            if key in self.announce:
                self.announce.pop(key)(run_id, resumed)
        elif reply[0] == "finished":
            self.finished[reply[1]] = reply[2]
        elif reply[0] == "registered":
            _, _, name, version, alias = reply
            also = f", alias {alias!r}" if alias else ""
            print(f"mlflow: registered model {name!r} version {version}{also} "
                  f"(models:/{name}/{version})", flush=True)
        elif reply[0] == "error":
            self.fail(reply[1], reply[2])

    def read_replies(self) -> None:
        while True:
            try:
                reply = self._replies.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self._handle(reply)

    def fail(self, kind: str, text: str) -> None:
        """Record the store's failure (the first one counts)."""
        if self.failure is None:
            self.failure = (kind, text)

    def failure_message(self) -> str:
        assert self.failure is not None
        return failure_message(self.uri, *self.failure)

    def raise_if_failed(self) -> None:
        self.read_replies()
        if self.failure is None and not self._stopped and not self._process.is_alive():
            self.read_replies()
            self.fail("store", f"the tracking process exited (code {self._process.exitcode})")
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the store's failure as a :class:`DlpipeError`, once."""
        if self.failure is not None and not self.failure_raised:
            self.failure_raised = True
            raise DlpipeError(self.failure_message())

    def send(self, *request: Any, check: bool = True) -> None:
        """Queue a request; first raise the store's failure, if any (unless ``check``
        is false)."""
        if check:
            self.raise_if_failed()
        if self._process.is_alive():
            self._requests.put(request)

    def stop(self, timeout: float = 120, check: bool = True) -> None:
        """Wait for every queued write (at most ``timeout`` s), then end the tracking
        process; raise its failure, if any and not raised yet (unless ``check`` is
        false)."""
        if self._process.is_alive():
            self._requests.put(("stop",))
            self._wait_stopped(timeout)
        elif not self._stopped:
            self.read_replies()
            self.fail("store", f"the tracking process exited (code {self._process.exitcode})")
        self._end()
        if check:
            self.raise_error()

    def _wait_stopped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._replies.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if not self._process.is_alive():
                    code = self._process.exitcode
                    self.fail("store", f"the tracking process exited (code {code})")
                    return
                if time.monotonic() >= deadline:
                    self.fail("connect" if not _is_local(self.uri) else "store",
                              f"the tracking store did not take the run's last writes in {timeout:.0f} s")
                    return
                continue
            if reply[0] == "stopped":
                return
            self._handle(reply)

    def abandon(self, kind: str, text: str) -> None:
        """Give up on the tracking process (it did not answer in time): end it now."""
        self.fail(kind, text)
        self._end(grace=0)

    def _end(self, grace: float = 15) -> None:
        """End the tracking process; if it was not stopped, give it ``grace`` seconds to
        close the runs it holds open as KILLED."""
        if self._stopped:
            return
        self._stopped = True
        if self._process.is_alive() and grace > 0:
            with contextlib.suppress(Exception):
                self._requests.put(("exit",))
            self._process.join(timeout=grace)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        # Nothing reads what is still queued: do not wait for it at exit.
        self._requests.cancel_join_thread()
        self._requests.close()
        atexit.unregister(self._end)


class Tracker:
    """One tracked run (``context.extras['mlflow']``): a top-level run owns the
    sidecar; a nested run (a tuning trial) shares its parent's."""

    def __init__(
        self, context: Any, parent: Tracker | None = None, spec_files: tuple[str, ...] = ()
    ) -> None:
        from dlpipe.spec import flatten_params

        settings = context.spec.settings.tracking
        self.context = context
        self.parent = parent
        self.sidecar: Sidecar
        if parent is not None:
            self.sidecar = parent.sidecar
        else:
            uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
            _check_store_file_now(uri)
            self.sidecar = Sidecar(uri)
        self.uri = self.sidecar.uri
        self.key = self.sidecar.new_key()
        #: The store has answered and the run exists (checked before the first stage).
        self.confirmed = False
        self.attached = parent is None and settings.attach_run_id is not None
        if self.attached:
            self.sidecar.send("attach", self.key, settings.attach_run_id)
            return
        artifact_root = settings.artifact_location or str(paths.default_artifact_root())
        resume_id = self._unfinished_run() if parent is None else None
        if parent is None:
            self.sidecar.announce[self.key] = self._announce
        self.send(
            "start",
            parent.key if parent else None,
            context.spec.experiment,
            artifact_root,
            context.run_name or settings.run_name or context.spec.name,
            _tags(context) | dict(settings.tags) | dict(context.tags),
            flatten_params(context.spec),
            resume_id,
            list(spec_files),
        )

    def _announce(self, run_id: str, resumed: int) -> None:
        where = f"in experiment {self.context.spec.experiment!r} ({self.uri})"
        if resumed:
            print(f"mlflow: resuming run {run_id} {where} (resume {resumed})", flush=True)
        else:
            print(f"mlflow: tracking run {run_id} {where}", flush=True)

    @property
    def run_file(self) -> Path:
        return Path(self.context.run_dir) / RUN_FILE

    def _unfinished_run(self) -> str | None:
        """The MLflow run of an earlier, unfinished run of this spec, to go on with."""
        path = self.run_file
        if self.context.restart:
            path.unlink(missing_ok=True)
            return None
        try:
            record = json.loads(path.read_text())
            run_id, uri = str(record["run_id"]), str(record["uri"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            print(f"mlflow: ignoring {path} (unreadable); tracking a new run", flush=True)
            return None
        if uri != self.uri:
            print(f"mlflow: the unfinished run {run_id} of this spec is in another store "
                  f"({uri}); tracking a new run in {self.uri}", flush=True)
            return None
        return run_id

    def remember(self) -> None:
        """Name the run in the run folder, so that a re-run goes on with it."""
        run_id = self.run_id
        if run_id is None or self.parent is not None or self.attached:
            return
        record = {"uri": self.uri, "run_id": run_id, "experiment": self.context.spec.experiment}
        try:
            atomic_write_text(self.run_file, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            print(f"mlflow: could not write {self.run_file} ({exc.strerror}); a re-run "
                  "will track a new run", flush=True)

    def forget(self) -> None:
        """The run has finished: the next run of the spec is a new MLflow run."""
        try:
            record = json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(record, dict) and record.get("run_id") == self.run_id:
            self.run_file.unlink(missing_ok=True)

    @property
    def run_id(self) -> str | None:
        self.sidecar.read_replies()
        run_id = self.sidecar.run_ids.get(self.key)
        if run_id is not None and self.context.run_id is None:
            self.context.run_id = run_id
        return run_id

    def send(self, op: str, *args: Any) -> None:
        self.sidecar.send(op, self.key, *args)

    def raise_if_failed(self) -> None:
        self.sidecar.raise_if_failed()

    def wait_for_run_id(self, timeout: float = 120) -> str:
        """Block until the run exists (for plugins that need the id mid-run)."""
        deadline = time.monotonic() + timeout
        while self.run_id is None and time.monotonic() < deadline:
            self.raise_if_failed()
            time.sleep(0.05)
        run_id = self.run_id
        if run_id is None:
            raise DlpipeError(f"MLflow tracking ({self.uri}) did not create the run in {timeout} s")
        return run_id

    def confirm(self) -> None:
        """Wait until the store has answered and the run exists, at most until
        :data:`CONNECT_TIMEOUT_S` after ``before_run``; then name the run in the run
        folder. Raises :class:`DlpipeError` when the store failed or did not answer."""
        limit = LOCAL_CONNECT_TIMEOUT_S if _is_local(self.uri) else CONNECT_TIMEOUT_S
        deadline = self.sidecar.started_at + limit
        while self.run_id is None:
            self.raise_if_failed()
            if time.monotonic() >= deadline:
                kind = "store" if _is_local(self.uri) else "connect"
                self.sidecar.abandon(kind, f"no answer from the tracking store in {limit:.0f} s")
                self.raise_if_failed()
            time.sleep(0.05)
        self.confirmed = True
        self.remember()

    def finish(
        self, status: str, error: str | None = None, timeout: float = 120, check: bool = True
    ) -> None:
        """Close the run; a top-level run also waits for every queued write (at most
        ``timeout`` s). Raises a tracking failure not raised yet, unless ``check`` is
        false (the run failed already: :meth:`report_end` tells of the store's failure)."""
        self.sidecar.send("finish", self.key, status, error, dict(self.context.tags), check=check)
        if self.parent is None:
            self.sidecar.stop(timeout, check=check)

    def report_end(self, status: str, message: str | None) -> None:
        """Print what became of the run in the store, as far as it is known."""
        sidecar = self.sidecar
        if sidecar.failure is not None and not sidecar.failure_raised:
            sidecar.failure_raised = True  # printed here, not raised: another error wins
            print(f"mlflow: {sidecar.failure_message()}", flush=True)
        run_id, recorded = self.run_id, sidecar.finished.get(self.key)
        store_error = sidecar.failure[1] if sidecar.failure else "the tracking store did not answer"
        if sidecar.failure is not None and status != "KILLED":
            status = "FAILED"  # what the sidecar marks a run whose tracking failed
        where = f"in experiment {self.context.spec.experiment!r} ({self.uri})"
        if run_id is None:
            print(f"mlflow: the run was not recorded: {store_error}", flush=True)
        elif sidecar.failure is not None and sidecar.failure[0] == "removed":
            print(f"mlflow: run {run_id} was not recorded: {store_error}", flush=True)
        elif recorded is None:
            print(f"mlflow: run {run_id} could not be marked {status} in the store "
                  f"({store_error}); it may still show as RUNNING", flush=True)
        elif recorded == "FINISHED":
            print(f"mlflow: run {run_id} FINISHED {where}; browse it with `dlpipe ui`")
        elif sidecar.failure is not None:
            print(f"mlflow: run {run_id} {recorded} {where}: MLflow tracking failed: "
                  f"{store_error}", flush=True)
        else:
            print(f"mlflow: run {run_id} {recorded}: {message}", flush=True)


def _tags(context: Any) -> dict[str, str]:
    spec = context.spec
    tags = {
        "dlpipe.spec_file": spec.source,
        "dlpipe.spec_digest": spec.digest(),
        "dlpipe.run_dir": str(context.run_dir),
        "mlflow.source.name": spec.source,
    }
    if spec.overrides:
        tags["dlpipe.overrides"] = " ".join(spec.overrides)
    for dist in ("dlpipe", "tensorflow", "keras", "mlflow", "optuna"):
        try:
            tags[f"version.{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    for info in context.plugins.plugins:
        tags[f"plugin.{info.name}"] = f"{info.version or '-'} ({info.source})"
    commit = _git_commit(Path(spec.source).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _tracker(context: Any) -> Tracker | None:
    return context.extras.get("mlflow")


# --------------------------------------------------------------------------------------
# The logged model (see dlpipe.packaging and docs/using-models.md)
# --------------------------------------------------------------------------------------


def log_model(
    client: Any, run_id: str, staged: str, registration: dict[str, Any] | None
) -> tuple[str, str, str | None] | None:
    """(In the sidecar.) Assemble the MLflow model from the folder the training process
    staged, log it under ``model``, and register it when the spec says so; returns
    ``(name, version, alias)`` of the registered version, if any."""
    import shutil
    import tempfile

    from dlpipe import packaging

    with tempfile.TemporaryDirectory(prefix="dlpipe-mlflow-model-") as tmp:
        try:
            folder = packaging.save_mlflow_model(staged, Path(tmp) / packaging.MODEL_ARTIFACT_PATH)
        except Exception as exc:  # not the store's failure: keep the run, log the file
            client.set_tag(run_id, "dlpipe.model_error", f"{type(exc).__name__}: {exc}"[:5000])
            client.log_artifact(run_id, str(Path(staged) / packaging.KERAS_FILE),
                                packaging.MODEL_ARTIFACT_PATH)
            return None
        # model.keras first and on its own, as before MLflow models: the folder's other
        # files join it under model/.
        keras_file = Path(tmp) / packaging.KERAS_FILE
        (folder / packaging.KERAS_FILE).rename(keras_file)
        client.log_artifact(run_id, str(keras_file), packaging.MODEL_ARTIFACT_PATH)
        client.log_artifacts(run_id, str(folder), packaging.MODEL_ARTIFACT_PATH)
    shutil.rmtree(staged, ignore_errors=True)  # a copy made for this request
    if not registration:
        return None
    name, alias = registration["name"], registration.get("alias")
    version = packaging.register_version(client, run_id, name, alias)
    return name, version, alias


def _stage_model(context: Any, path: str) -> Path | None:
    """(In the training process.) Write what the sidecar needs to log the MLflow model
    of ``context.model``, saved at ``path``; ``None`` when it cannot be staged (the
    ``.keras`` file is then logged on its own)."""
    from dlpipe import packaging

    folder = Path(context.run_dir) / "mlflow_model"
    try:
        return packaging.stage_model(
            context.model, path, folder, context.data, context.model_entry(), context,
            export=context.spec.settings.tracking.export,
        )
    except Exception as exc:
        print(f"mlflow: logging model/model.keras only; the MLflow model could not be "
              f"prepared ({type(exc).__name__}: {exc})", flush=True)
        return None


@hookimpl
def before_run(context: Any) -> None:
    if not context.spec.settings.tracking.enabled:
        return
    if context.parent is not None:  # a nested run (a trial) is a child of its parent's
        parent = _tracker(context.parent)
        if parent is not None:
            context.extras["mlflow"] = Tracker(context, parent=parent)
        return
    spec_files: list[str] = []
    if context.spec.settings.tracking.attach_run_id is None:
        import yaml

        spec_dir = context.run_dir / "spec"
        spec_dir.mkdir(parents=True, exist_ok=True)
        resolved = spec_dir / "resolved.yaml"
        resolved.write_text(yaml.safe_dump(context.spec.resolved_dict(), sort_keys=False))
        spec_files.append(str(resolved))
        source = Path(context.spec.source)
        if source.is_file():
            spec_files.append(str(source.resolve()))
    # The sidecar connects while TensorFlow is imported; the first stage waits for it.
    context.extras["mlflow"] = Tracker(context, spec_files=tuple(spec_files))


@hookimpl
def before_stage(context: Any, stage: Any) -> None:
    tracker = _tracker(context)
    if tracker is not None and tracker.parent is None and not tracker.confirmed:
        tracker.confirm()


@hookimpl
def on_metrics(context: Any, stage: Any, metrics: dict[str, float], step: int | None) -> None:
    tracker = _tracker(context)
    if tracker is not None and metrics:
        tracker.send("metrics", dict(metrics), step, int(time.time() * 1000))


@hookimpl
def on_artifact(context: Any, stage: Any, path: str, artifact_path: str) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    settings = context.spec.settings.tracking
    if artifact_path == "model" and not settings.log_model:
        return
    # The final model (model/model.keras) is logged as an MLflow model with it.
    if artifact_path == "model" and Path(path).name == "model.keras" and context.model is not None:
        staged = _stage_model(context, path)
        if staged is not None:
            registration = settings.registration
            tracker.send("model", str(staged.resolve()),
                         registration.model_dump() if registration else None)
            return
    tracker.send("artifact", str(Path(path).resolve()), artifact_path or None)


@hookimpl
def after_run(context: Any) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    try:
        tracker.finish("FINISHED")
    except DlpipeError:
        if tracker.parent is None and not tracker.attached:
            tracker.report_end("FINISHED", None)
        raise
    if tracker.parent is None and not tracker.attached:
        tracker.forget()
        tracker.report_end("FINISHED", None)


@hookimpl
def on_run_error(context: Any, error: BaseException) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    message: str | None = f"{type(error).__name__}: {error}"
    if isinstance(error, RunStopped):  # stopped on purpose (a pruned trial)
        status, message = "FINISHED", None
        context.tags.setdefault("dlpipe.state", error.state)
    else:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    if tracker.parent is None and status != "FINISHED":
        tracker.remember()  # in case the first stage did not get to it
    # The run has failed already: do not wait long for the store, and let its error
    # win over a store failure (report_end prints that one).
    tracker.finish(status, message, timeout=30, check=False)
    if tracker.parent is None and not tracker.attached:
        if status == "FINISHED":
            tracker.forget()
        tracker.report_end(status, message)
