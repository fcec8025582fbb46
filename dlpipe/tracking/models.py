"""The model a run logs: staged by the training process, logged and registered by the
tracking process (see :mod:`dlpipe.packaging` and docs/using-models.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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

