"""The tracking process (the sidecar) and the training process's end of it.

MLflow runs in a sidecar process (:func:`serve`). Importing it, opening the store and
every write happen there, in order, on the machine's other core: the training process
never imports MLflow, never waits for the database, and exits without tearing MLflow
down. :class:`Sidecar` queues the requests and reads the replies.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError
from dlpipe.tracking.models import log_model
from dlpipe.tracking.store import (
    _BOUNDED_HTTP,
    _RUN_HTTP,
    _environment,
    _is_local,
    _store_lock,
    check_store_file,
    describe_failure,
    failure_message,
)

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

    def experiment_id(name: str, artifact_location: str | None) -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        if artifact_location is None:  # the server's own artifact store
            location = None
        elif "://" in artifact_location:  # s3://..., mlflow-artifacts:/..., file://...
            location = f"{artifact_location.rstrip('/')}/{name}"
        else:
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


# --------------------------------------------------------------------------------------
# The training process's end: requests out, replies in
# --------------------------------------------------------------------------------------


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
        # The process runs ``dlpipe.tracking.serve``, looked up there on each start, so
        # that a test can put a faulty store behind it.
        from dlpipe import tracking

        mp = multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._replies = mp.Queue()
        self._process = mp.Process(
            target=tracking.serve, args=(uri, self._requests, self._replies),
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

