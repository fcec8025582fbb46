"""MLflow tracking, as a plugin on the lifecycle hooks.

One MLflow run per pipeline run: the flattened resolved spec as params, every epoch's
metrics, tags with versions and the git commit, and every artifact a stage reports. A
failure marks the run FAILED with the error; an interrupt marks it KILLED.

All MLflow work (its import, opening the store, every write) happens on one background
thread, in order, so training never waits for tracking. ``after_run`` and
``on_run_error`` wait for the queue to drain, so nothing is lost.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from dlpipe import hookimpl, paths
from dlpipe.errors import DlpipeError

_KEY = "mlflow"


class Tracker:
    """The MLflow side of one pipeline run (kept in ``context.extras['mlflow']``)."""

    def __init__(self, context: Any) -> None:
        from dlpipe.spec import flatten_params

        settings = context.spec.model.tracking
        self.uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
        self.run_id: str | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="dlpipe-mlflow", daemon=True)
        self._thread.start()
        self.submit(
            self._start,
            context,
            context.spec.experiment,
            settings.artifact_location,
            settings.run_name or context.spec.name,
            _tags(context) | dict(settings.tags),
            flatten_params(context.spec),
        )

    # -- the worker -----------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.raise_if_failed()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            fn, args = item
            try:
                fn(*args)
            except BaseException as exc:  # reported on the main thread
                self.error = exc
            finally:
                if fn is self._start:
                    self.ready.set()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise DlpipeError(
                f"MLflow tracking failed ({self.uri}): {type(error).__name__}: {error}\n"
                "    fix tracking.uri / MLFLOW_TRACKING_URI, or run with --no-track"
            ) from error

    def close(self) -> None:
        """Wait until every queued write is done; re-raise a tracking failure."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()

    # -- work items (run on the worker thread) ----------------------------------------------
    def _start(
        self,
        context: Any,
        experiment: str,
        artifact_location: str | None,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
    ) -> None:
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = str(found.experiment_id)
        else:
            root = Path(artifact_location) if artifact_location else paths.default_artifact_root()
            location = (root.resolve() / experiment).as_uri()
            experiment_id = str(self.client.create_experiment(experiment, artifact_location=location))
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = context.run_id = run.info.run_id
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, v, timestamp, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self._run(), metrics=batch)

    def _log_artifact(self, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(self._run(), path, artifact_path)

    def _log_flavor(self, model: Any) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.keras.log_model(model, name="mlflow_model", pip_requirements=["tensorflow", "keras>=3"])

    def _finish(self, status: str, error: str | None) -> None:
        if error:
            self.client.set_tag(self._run(), "dlpipe.error", error[:5000])
        self.client.set_terminated(self._run(), status)

    def _run(self) -> str:
        assert self.run_id is not None, "the run is created by the first work item"
        return self.run_id

    # -- the hooks' side ----------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self.submit(self._log_metrics, metrics, step, int(time.time() * 1000))

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        self.submit(self._log_artifact, path, artifact_path)

    def finish(self, status: str, error: str | None = None) -> None:
        self._queue.put((self._finish, (status, error)))
        self.close()


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
    tracker.log_artifact(str(resolved), "spec")
    source = Path(context.spec.source)
    if source.is_file():
        tracker.log_artifact(str(source), "spec")


@hookimpl
def on_metrics(context: Any, stage: Any, metrics: dict[str, float], step: int | None) -> None:
    tracker = _tracker(context)
    if tracker is not None and metrics:
        tracker.log_metrics(dict(metrics), step)


@hookimpl
def on_artifact(context: Any, stage: Any, path: str, artifact_path: str) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    if artifact_path == "model" and not context.spec.model.tracking.log_model:
        return
    tracker.log_artifact(path, artifact_path or None)
    if artifact_path == "model" and context.spec.model.tracking.mlflow_flavor:
        tracker.submit(tracker._log_flavor, context.model)


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
