"""MLflow tracking, as a plugin on the lifecycle hooks.

One MLflow run per pipeline run: the flattened resolved spec as params, every epoch's
metrics (logged asynchronously, once per epoch), tags with versions and the git commit,
and every artifact a stage reports. A failure marks the run FAILED with the error; an
interrupt marks it KILLED. MLflow is imported only when a run starts.
"""

from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dlpipe import hookimpl, paths

_KEY = "mlflow"


class Tracker:
    """The MLflow side of one pipeline run (kept in ``context.extras['mlflow']``)."""

    def __init__(self, context: Any) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        settings = context.spec.model.tracking
        self.uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(context.spec.experiment, settings.artifact_location)
        run = self.client.create_run(
            self.experiment_id,
            run_name=settings.run_name or context.spec.name,
            tags=_tags(context) | dict(settings.tags),
        )
        self.run_id = run.info.run_id
        self.pending: list[Any] = []

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        root = Path(artifact_location) if artifact_location else paths.default_artifact_root()
        location = (root.resolve() / name).as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self) -> None:
        for op in self.pending:
            op.wait()
        self.pending.clear()

    def finish(self, status: str, error: str | None = None) -> None:
        try:
            self.flush()
        finally:
            if error:
                self.client.set_tag(self.run_id, "dlpipe.error", error[:5000])
            self.client.set_terminated(self.run_id, status)


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

    from dlpipe.spec import flatten_params

    tracker = Tracker(context)
    context.extras[_KEY] = tracker
    context.run_id = tracker.run_id
    tracker.log_params(flatten_params(context.spec))
    spec_dir = context.run_dir / "spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    resolved = spec_dir / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(context.spec.resolved_dict(), sort_keys=False))
    tracker.client.log_artifact(tracker.run_id, str(resolved), "spec")
    source = Path(context.spec.source)
    if source.is_file():
        tracker.client.log_artifact(tracker.run_id, str(source), "spec")
    print(f"mlflow: run {tracker.run_id} in experiment {context.spec.experiment!r} ({tracker.uri})")


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
    tracker.client.log_artifact(tracker.run_id, path, artifact_path or None)
    if artifact_path == "model" and context.spec.model.tracking.mlflow_flavor:
        _log_flavor(tracker, context.model)


def _log_flavor(tracker: Tracker, model: Any) -> None:
    mlflow = tracker.mlflow
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.run_id):
        mlflow.keras.log_model(
            model, name="mlflow_model", pip_requirements=["tensorflow", "keras>=3"]
        )


@hookimpl
def after_run(context: Any) -> None:
    tracker = _tracker(context)
    if tracker is not None:
        tracker.finish("FINISHED")
        print(f"mlflow: run {tracker.run_id} FINISHED; browse it with `dlpipe ui`")


@hookimpl
def on_run_error(context: Any, error: BaseException) -> None:
    tracker = _tracker(context)
    if tracker is None:
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    message = f"{type(error).__name__}: {error}"
    tracker.finish(status, message)
    print(f"mlflow: run {tracker.run_id} {status}: {message}")
