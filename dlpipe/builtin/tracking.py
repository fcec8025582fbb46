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
import itertools
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
from dlpipe.errors import DlpipeError, RunStopped

_KEY = "mlflow"


# --------------------------------------------------------------------------------------
# The sidecar: a plain function run in a spawned process
# --------------------------------------------------------------------------------------


def serve(uri: str, requests: Any, replies: Any) -> None:
    """Apply tracking requests in order until ``stop``; report run ids and errors.

    One sidecar serves a run and the runs nested in it (tuning trials). Requests are
    tuples naming a run by a key the training process chose: ``("start", key,
    parent_key, experiment, artifact_location, run_name, tags, params)``, ``("attach",
    key, run_id)`` (log into an existing run and leave it open), ``("metrics", key,
    metrics, step, timestamp_ms)``, ``("artifact", key, path, artifact_path)``,
    ``("finish", key, status, error, tags)`` and ``("stop",)``.
    """
    # Ctrl+C reaches the whole process group; the training process decides what the
    # run's status becomes, so the sidecar must outlive the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parent = multiprocessing.parent_process()
    client: Any = None
    runs: dict[str, str] = {}  # key -> MLflow run id
    open_runs: set[str] = set()  # keys this sidecar started and has not finished
    failed = False
    pending: dict[str, list[Any]] = {}  # metrics are written in batches, at most every 2 s
    last_write = time.monotonic()

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
            found = MlflowClient(tracking_uri=uri)
            found.search_experiments(max_results=1)
        return found

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
                # The training process died without closing its runs (kill -9, OOM):
                # leave none RUNNING.
                if client is not None and not failed:
                    for key in open_runs:
                        client.set_tag(runs[key], "dlpipe.error", "the training process died")
                        client.set_terminated(runs[key], "KILLED")
                return
            continue
        op = request[0]
        if op == "stop":
            replies.put(("stopped",))
            # Everything is written; skip tearing MLflow down (about a second).
            replies.close()
            replies.join_thread()
            os._exit(0)
        if failed:
            continue
        try:
            if op != "metrics":
                write_metrics()
            if client is None:
                client = connect()
            key = request[1]
            if op == "start":
                from mlflow.entities import Param

                _, key, parent_key, experiment, artifact_location, run_name, tags, params = request
                found = client.get_experiment_by_name(experiment)
                if found is not None:
                    experiment_id = str(found.experiment_id)
                else:
                    location = (Path(artifact_location).resolve() / experiment).as_uri()
                    try:
                        experiment_id = str(
                            client.create_experiment(experiment, artifact_location=location)
                        )
                    except Exception:  # another process created it first
                        experiment_id = str(client.get_experiment_by_name(experiment).experiment_id)
                if parent_key is not None:
                    tags = {**tags, "mlflow.parentRunId": runs[parent_key]}
                run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
                runs[key] = run_id
                open_runs.add(key)
                replies.put(("started", key, run_id))
                items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    client.log_batch(run_id, params=items[i : i + 100])
            elif op == "attach":
                runs[key] = request[2]
                replies.put(("started", key, request[2]))
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


class Sidecar:
    """The training process's end of the tracking process: queues, replies, run ids."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.run_ids: dict[str, str] = {}
        self.error: str | None = None
        #: A line to print once the run with this key exists (``{}`` is its id).
        self.announce: dict[str, str] = {}
        self._keys = itertools.count()
        mp = multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._replies = mp.Queue()
        self._process = mp.Process(
            target=serve, args=(uri, self._requests, self._replies),
            name="dlpipe-mlflow", daemon=True,
        )
        self._process.start()

    def new_key(self) -> str:
        return f"run-{next(self._keys)}"

    def read_replies(self, block_until_stopped: bool = False) -> None:
        while True:
            try:
                reply = self._replies.get(timeout=120) if block_until_stopped else self._replies.get_nowait()
            except queue.Empty:
                if block_until_stopped:
                    self.error = self.error or "the tracking process stopped answering"
                return
            if reply[0] == "started":
                self.run_ids[reply[1]] = reply[2]
                if reply[1] in self.announce:
                    print(self.announce.pop(reply[1]).format(reply[2]), flush=True)
            elif reply[0] == "error":
                self.error = self.error or reply[1]
            elif reply[0] == "stopped":
                return

    def raise_if_failed(self) -> None:
        self.read_replies()
        if self.error is None and not self._process.is_alive():
            self.error = f"the tracking process exited (code {self._process.exitcode})"
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise DlpipeError(
                f"MLflow tracking failed ({self.uri}): {error}\n"
                "    fix tracking.uri / MLFLOW_TRACKING_URI, or run with --no-track"
            )

    def send(self, *request: Any) -> None:
        self.raise_if_failed()
        self._requests.put(request)

    def stop(self) -> None:
        """Wait for every queued write, then end the tracking process."""
        if self._process.is_alive():
            self._requests.put(("stop",))
            self.read_replies(block_until_stopped=True)
            self._process.join(timeout=30)
        self._requests.close()
        self.raise_error()


class Tracker:
    """One tracked run (``context.extras['mlflow']``): a top-level run owns the
    sidecar; a nested run (a tuning trial) shares its parent's."""

    def __init__(self, context: Any, parent: Tracker | None = None) -> None:
        from dlpipe.spec import flatten_params

        settings = context.spec.model.tracking
        self.context = context
        self.parent = parent
        self.sidecar: Sidecar
        if parent is not None:
            self.sidecar = parent.sidecar
        else:
            uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
            self.sidecar = Sidecar(uri)
        self.uri = self.sidecar.uri
        self.key = self.sidecar.new_key()
        self.attached = parent is None and settings.attach_run_id is not None
        if self.attached:
            self.sidecar.send("attach", self.key, settings.attach_run_id)
            return
        artifact_root = settings.artifact_location or str(paths.default_artifact_root())
        if parent is None:
            self.sidecar.announce[self.key] = (
                f"mlflow: tracking run {{}} in experiment {context.spec.experiment!r} ({self.uri})"
            )
        self.send(
            "start",
            parent.key if parent else None,
            context.spec.experiment,
            artifact_root,
            context.run_name or settings.run_name or context.spec.name,
            _tags(context) | dict(settings.tags) | dict(context.tags),
            flatten_params(context.spec),
        )

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

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the run; a top-level run also waits for every queued write and
        re-raises a tracking failure."""
        self.send("finish", status, error, dict(self.context.tags))
        if self.parent is None:
            self.sidecar.stop()


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
    if context.parent is not None:  # a nested run (a trial) is a child of its parent's
        parent = _tracker(context.parent)
        if parent is not None:
            context.extras[_KEY] = Tracker(context, parent=parent)
        return
    import yaml

    tracker = Tracker(context)
    context.extras[_KEY] = tracker
    if tracker.attached:
        return
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
    if tracker is None:
        return
    tracker.finish("FINISHED")
    if tracker.parent is None and not tracker.attached:
        print(
            f"mlflow: run {tracker.run_id} FINISHED in experiment "
            f"{context.spec.experiment!r} ({tracker.uri}); browse it with `dlpipe ui`"
        )


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
    try:
        tracker.finish(status, message)
    except DlpipeError as exc:
        print(f"mlflow: could not record the failure: {exc}")
        return
    if tracker.parent is None:
        print(f"mlflow: run {tracker.run_id} {status}: {message}")
