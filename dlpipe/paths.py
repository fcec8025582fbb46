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
        return absolute_sqlite(uri)
    return f"sqlite:///{(home() / 'mlflow.db').resolve().as_posix()}"


def absolute_sqlite(uri: str) -> str:
    """Make a relative ``sqlite:///path`` absolute.

    MLflow caches one database engine per URI string, so a relative path would keep
    pointing at the first working directory it was used from.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + Path(uri[len(prefix):]).resolve().as_posix()
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (``None`` for other stores and for
    an in-memory database)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def default_artifact_root() -> Path:
    return home() / "artifacts"
