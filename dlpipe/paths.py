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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader, or the next run after a crash, finds
    the old file or the new one, never a part: a temporary file beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)
