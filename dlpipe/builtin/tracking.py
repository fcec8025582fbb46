"""MLflow tracking, as a plugin on the lifecycle hooks.

One MLflow run per pipeline run: the flattened resolved spec as params, every epoch's
metrics, tags with versions and the git commit, and every artifact a stage reports. A
failure marks the run FAILED with the error; an interrupt marks it KILLED.

MLflow runs in a sidecar process. Importing it, opening the store and every write
happen there, in order, on the machine's other core: the training process never imports
MLflow, never waits for the database, and exits without tearing MLflow down.
``after_run`` and ``on_run_error`` wait for the sidecar to finish, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from dlpipe import hookimpl, paths
from dlpipe.errors import DlpipeError

_KEY = "mlflow"


# --------------------------------------------------------------------------------------
# The sidecar: a plain function run in a spawned process
# --------------------------------------------------------------------------------------


def serve(uri: str, requests: Any, replies: Any) -> None:
    """Apply tracking requests in order until ``stop``; report the run id and errors.

    Requests are tuples: ``("start", experiment, artifact_location, run_name, tags,
    params)``, ``("metrics", metrics, step, timestamp_ms)``, ``("artifact", path,
    artifact_path)``, ``("finish", status, error)`` and ``("stop",)``.
    """
    # Ctrl+C reaches the whole process group; the training process decides what the
    # run's status becomes, so the sidecar must outlive the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parent = multiprocessing.parent_process()
    client: Any = None
    run_id: str | None = None
    failed = False
    pending: list[Any] = []  # metrics are written in batches, at most every 2 s
    last_write = time.monotonic()

    def write_metrics() -> None:
        nonlocal last_write
        if pending and client is not None and run_id is not None:
            client.log_batch(run_id, metrics=list(pending))
        pending.clear()
        last_write = time.monotonic()

    while True:
        try:
            request = requests.get(timeout=2)
        except queue.Empty:
            if pending and not failed:
                try:
                    write_metrics()
                except BaseException as exc:
                    failed = True
                    replies.put(("error", f"{type(exc).__name__}: {exc}"))
            if parent is not None and not parent.is_alive():
                # The training process died without closing the run (kill -9, OOM):
                # leave no run RUNNING.
                if client is not None and run_id is not None and not failed:
                    client.set_tag(run_id, "dlpipe.error", "the training process died")
                    client.set_terminated(run_id, "KILLED")
                return
            continue
        op = request[0]
        if op == "stop":
            replies.put(("stopped", run_id))
            # Everything is written; skip tearing MLflow down (about a second).
            replies.close()
            replies.join_thread()
            os._exit(0)
        if failed:
            continue
        try:
            if op != "metrics":
                write_metrics()
            if op == "start":
                from mlflow.entities import Param
                from mlflow.tracking import MlflowClient

                _, experiment, artifact_location, run_name, tags, params = request
                client = MlflowClient(tracking_uri=uri)
                with _store_lock(uri):  # two processes must not create the tables at once
                    found = client.get_experiment_by_name(experiment)
                if found is not None:
                    experiment_id = str(found.experiment_id)
                else:
                    location = (Path(artifact_location).resolve() / experiment).as_uri()
                    experiment_id = str(
                        client.create_experiment(experiment, artifact_location=location)
                    )
                run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
                replies.put(("started", run_id))
                items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    client.log_batch(run_id, params=items[i : i + 100])
            elif op == "metrics":
                from mlflow.entities import Metric

                _, metrics, step, timestamp = request
                pending.extend(Metric(k, v, timestamp, step or 0) for k, v in metrics.items())
                if time.monotonic() - last_write >= 2.0 or len(pending) >= 900:
                    write_metrics()
            elif op == "artifact":
                client.log_artifact(run_id, request[1], request[2])
            elif op == "finish":
                _, status, error = request
                if error:
                    client.set_tag(run_id, "dlpipe.error", error[:5000])
                client.set_terminated(run_id, status)
        except BaseException as exc:  # reported to the training process
            failed = True
            replies.put(("error", f"{type(exc).__name__}: {exc}"))


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock next to a SQLite store while it may be initialised."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Tracker:
    """The training process's handle on the sidecar (``context.extras['mlflow']``)."""

    def __init__(self, context: Any) -> None:
        from dlpipe.spec import flatten_params

        settings = context.spec.model.tracking
        self.context = context
        self.uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
        self.run_id: str | None = None
        self._error: str | None = None
        mp = multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._replies = mp.Queue()
        self._process = mp.Process(
            target=serve, args=(self.uri, self._requests, self._replies),
            name="dlpipe-mlflow", daemon=True,
        )
        self._process.start()
        artifact_root = settings.artifact_location or str(paths.default_artifact_root())
        self.send(
            "start",
            context.spec.experiment,
            artifact_root,
            settings.run_name or context.spec.name,
            _tags(context) | dict(settings.tags),
            flatten_params(context.spec),
        )

    def _read_replies(self, block_until_stopped: bool = False) -> None:
        while True:
            try:
                reply = self._replies.get(timeout=120) if block_until_stopped else self._replies.get_nowait()
            except queue.Empty:
                if block_until_stopped:
                    self._error = self._error or "the tracking process stopped answering"
                return
            if reply[0] == "started":
                self.run_id = self.context.run_id = reply[1]
                print(f"mlflow: tracking run {self.run_id} in experiment "
                      f"{self.context.spec.experiment!r} ({self.uri})", flush=True)
            elif reply[0] == "error":
                self._error = self._error or reply[1]
            elif reply[0] == "stopped":
                self.run_id = reply[1] or self.run_id
                return

    def raise_if_failed(self) -> None:
        self._read_replies()
        if self._error is None and not self._process.is_alive():
            self._error = f"the tracking process exited (code {self._process.exitcode})"
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise DlpipeError(
                f"MLflow tracking failed ({self.uri}): {error}\n"
                "    fix tracking.uri / MLFLOW_TRACKING_URI, or run with --no-track"
            )

    def send(self, *request: Any) -> None:
        self.raise_if_failed()
        self._requests.put(request)

    def wait_for_run_id(self, timeout: float = 120) -> str:
        """Block until the run exists (for plugins that need the id mid-run)."""
        deadline = time.monotonic() + timeout
        while self.run_id is None and time.monotonic() < deadline:
            self.raise_if_failed()
            time.sleep(0.05)
        if self.run_id is None:
            raise DlpipeError(f"MLflow tracking ({self.uri}) did not create the run in {timeout} s")
        return self.run_id

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the run and wait for every queued write; re-raise a tracking failure."""
        if self._process.is_alive():
            self._requests.put(("finish", status, error))
            self._requests.put(("stop",))
            self._read_replies(block_until_stopped=True)
            self._process.join(timeout=30)
        self._requests.close()
        self._raise_error()


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
    return context.extras.get(_KEY)


def _log_flavor(tracker: Tracker, model: Any) -> None:
    """The MLflow Keras flavour needs the live model, so it is logged from here."""
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.wait_for_run_id()):
        mlflow.keras.log_model(model, name="mlflow_model", pip_requirements=["tensorflow", "keras>=3"])


@hookimpl
def before_run(context: Any) -> None:
    if not context.spec.model.tracking.enabled:
        return
    import yaml

    tracker = Tracker(context)
    context.extras[_KEY] = tracker
    spec_dir = context.run_dir / "spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    resolved = spec_dir / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(context.spec.resolved_dict(), sort_keys=False))
    tracker.send("artifact", str(resolved), "spec")
    source = Path(context.spec.source)
    if source.is_file():
        tracker.send("artifact", str(source.resolve()), "spec")


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
    if artifact_path == "model" and not context.spec.model.tracking.log_model:
        return
    tracker.send("artifact", str(Path(path).resolve()), artifact_path or None)
    if artifact_path == "model" and context.spec.model.tracking.mlflow_flavor:
        _log_flavor(tracker, context.model)


@hookimpl
def after_run(context: Any) -> None:
    tracker = _tracker(context)
    if tracker is not None:
        tracker.finish("FINISHED")
        print(
            f"mlflow: run {tracker.run_id} FINISHED in experiment "
            f"{context.spec.experiment!r} ({tracker.uri}); browse it with `dlpipe ui`"
        )


@hookimpl
def on_run_error(context: Any, error: BaseException) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    message = f"{type(error).__name__}: {error}"
    try:
        tracker.finish(status, message)
    except DlpipeError as exc:
        print(f"mlflow: could not record the failure: {exc}")
        return
    print(f"mlflow: run {tracker.run_id} {status}: {message}")
