"""Where dlpipe writes: everything lives under ``mlruns/`` of the working directory."""

from __future__ import annotations

import os
from pathlib import Path

#: Override the output root (default ``./mlruns``).
HOME_ENV = "DLPIPE_HOME"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV, "mlruns"))


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else SQLite under the output root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(home() / 'mlflow.db').as_posix()}"


def default_artifact_root() -> Path:
    return home() / "artifacts"
