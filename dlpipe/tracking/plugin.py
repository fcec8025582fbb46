"""The tracking plugin's hooks: start the run before the first stage, send metrics and
artifacts (the final model as an MLflow model), close the run as it ended.

:mod:`dlpipe.tracking` registers these; the plugin module is the package.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dlpipe import hookimpl
from dlpipe.errors import DlpipeError, RunStopped
from dlpipe.tracking.models import _stage_model
from dlpipe.tracking.run import Tracker


def _tracker(context: Any) -> Tracker | None:
    return context.extras.get("mlflow")


@hookimpl
def before_run(context: Any) -> None:
    # Only the chief of a multi-worker cluster tracks the run; the other workers never
    # get a tracker, so every hook below does nothing for them.
    if not context.spec.settings.tracking.enabled or not getattr(context, "is_chief", True):
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
        staged = _stage_model_of_chief(context, path)
        if staged is not None:
            registration = settings.registration
            tracker.send("model", str(staged.resolve()),
                         registration.model_dump() if registration else None)
            return
    tracker.send("artifact", str(Path(path).resolve()), artifact_path or None)


def _stage_model_of_chief(context: Any, path: str) -> Path | None:
    """Stage the MLflow model. Staging predicts with the model; under a multi-worker
    strategy ``predict`` is a collective op the other workers do not join, so the chief
    stages a copy loaded from ``path`` outside the strategy instead."""
    from dlpipe.strategies.multi_worker import worker_of

    if worker_of(getattr(context, "strategy", None)) is None:
        return _stage_model(context, path)
    import keras

    model = context.model
    try:
        context.model = keras.models.load_model(path, compile=False)
    except Exception as exc:
        print(f"mlflow: logging model/model.keras only; it could not be reloaded to stage "
              f"the MLflow model ({type(exc).__name__}: {exc})", flush=True)
        return None
    try:
        return _stage_model(context, path)
    finally:
        context.model = model


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
