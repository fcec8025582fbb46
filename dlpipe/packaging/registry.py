"""Model references and the MLflow model registry: a run id, ``runs:/``,
``models:/NAME@alias``, ``models:/NAME/VERSION`` or a path made into a URI MLflow can
load; registering a run's model as a new version."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError
from dlpipe.packaging.layout import KERAS_FILE, MODEL_ARTIFACT_PATH

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: The start of a run id (``dlpipe`` prints the first 8 characters).
_RUN_PREFIX = re.compile(r"^[0-9a-f]{6,31}$")


def _is_local(text: str) -> bool:
    return "://" not in text and not text.startswith(("runs:/", "models:/"))


def resolve_model_uri(text: str, tracking_uri: str) -> str:
    """A model URI MLflow can load, from what a person typed.

    Accepts a run id (its ``model``), ``runs:/ID/model``, ``models:/NAME@alias``,
    ``models:/NAME/3``, or a local path to an MLflow model folder or a ``.keras`` file
    (returned absolute). Runs and registered models are checked in the store at
    ``tracking_uri``; a :class:`DlpipeError` says what is missing and what exists.
    """
    text = text.strip()
    is_run = bool(_RUN_ID.match(text)) or (bool(_RUN_PREFIX.match(text)) and not Path(text).exists())
    if _is_local(text) and not is_run:
        path = Path(text).expanduser()
        if path.is_file() and path.suffix == ".keras":
            return str(path.resolve())
        if path.is_dir():
            for candidate in (path, path / MODEL_ARTIFACT_PATH):
                if (candidate / "MLmodel").is_file():
                    return str(candidate.resolve())
            if (path / KERAS_FILE).is_file():
                return str((path / KERAS_FILE).resolve())
        if path.exists():
            raise DlpipeError(f"{text}: neither an MLflow model folder (with MLmodel) nor a .keras file")
        raise DlpipeError(
            f"no model {text!r}: give a run id, runs:/ID/model, models:/NAME@alias, "
            "models:/NAME/VERSION, or a path to an MLflow model folder or a .keras file"
        )
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if is_run:
        text = f"runs:/{_full_run_id(client, text, tracking_uri)}/{MODEL_ARTIFACT_PATH}"
    if text.startswith("runs:/"):
        run_id, _, artifact = text[len("runs:/"):].partition("/")
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            raise DlpipeError(f"no run {run_id} in {tracking_uri}") from exc
        artifact = artifact.strip("/") or MODEL_ARTIFACT_PATH
        names = {a.path for a in client.list_artifacts(run_id, artifact)}
        if f"{artifact}/MLmodel" in names or artifact.endswith(".keras"):
            return f"runs:/{run_id}/{artifact}"
        if f"{artifact}/{KERAS_FILE}" in names:  # logged before models were MLflow models
            return f"runs:/{run_id}/{artifact}/{KERAS_FILE}"
        raise DlpipeError(f"run {run_id} has no model at {artifact!r} (artifacts: {sorted(names) or 'none'})")
    if text.startswith("models:/"):
        rest = text[len("models:/"):]
        name, alias, version = rest, None, None
        if "@" in rest:
            name, _, alias = rest.partition("@")
        elif "/" in rest:
            name, _, version = rest.partition("/")
        try:
            if alias:
                client.get_model_version_by_alias(name, alias)
            elif version:
                client.get_model_version(name, version)
            else:
                raise DlpipeError(f"{text}: give a version or an alias (models:/{name}/1, models:/{name}@champion)")
        except MlflowException as exc:
            raise DlpipeError(_registry_problem(client, name, alias, version, tracking_uri)) from exc
        return text
    raise DlpipeError(f"cannot load a model from {text!r}")


def _full_run_id(client: Any, text: str, tracking_uri: str) -> str:
    """The run whose id is or starts with ``text`` (the one run, or an error)."""
    if _RUN_ID.match(text):
        return text
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    found = client.search_runs(
        experiments, filter_string=f"attributes.run_id LIKE '{text}%'", max_results=10
    ) if experiments else []
    if len(found) == 1:
        return str(found[0].info.run_id)
    if not found:
        raise DlpipeError(f"no run {text}... in {tracking_uri}")
    ids = ", ".join(r.info.run_id for r in found)
    raise DlpipeError(f"{text} is the start of several run ids ({ids}); give more of it")


def _registry_problem(client: Any, name: str, alias: str | None, version: str | None, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        return f"no registered model {name!r} in {uri} (registered: {', '.join(known) or 'none'})"
    if alias:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        return f"registered model {name!r} has no alias {alias!r} (aliases: {', '.join(aliases) or 'none'})"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return f"registered model {name!r} has no version {version} (versions: {versions or 'none'})"


def registered_source(uri: str, tracking_uri: str) -> str:
    """Where the files of ``models:/NAME@alias`` or ``models:/NAME/VERSION`` are."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = rest.partition("/")
    return str(client.get_model_version_download_uri(name, version))


def register_version(client: Any, run_id: str, name: str, alias: str | None = None,
                     artifact_path: str = MODEL_ARTIFACT_PATH) -> str:
    """Register the run's MLflow model as a new version of ``name`` (created if new)
    and point ``alias`` at it; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"runs:/{run_id}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"dlpipe.run_id": run_id})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
