"""The files of a dlpipe MLflow model folder, and reading its ``dlpipe.json``."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

#: Where a run's MLflow model lives among its artifacts.
MODEL_ARTIFACT_PATH = "model"
KERAS_FILE = "model.keras"
META_FILE = "dlpipe.json"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
#: Local plugin modules (``plugins/*.py``) the model's classes come from, shipped along.
CODE_DIR = "code"
#: Files the training process hands to :func:`save_mlflow_model` besides the above.
_EXAMPLE_FILE = "examples.npz"

#: Version of the ``dlpipe.json`` layout.
FORMAT_VERSION = 1

#: How many test examples make the logged input example.
EXAMPLE_ROWS = 2


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``dlpipe.json`` of a local model folder (``{}`` when there is none)."""
    file = Path(folder) / META_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
