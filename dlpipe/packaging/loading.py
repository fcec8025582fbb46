"""Loading a model: the ``python_function`` flavour's entry point, the Keras model of any
model reference, and :class:`Predictor`, a model behind one ``predict`` call."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.packaging.classes import import_model_modules, register_custom_objects
from dlpipe.packaging.inference import _as_array, _first, predict
from dlpipe.packaging.layout import KERAS_FILE, read_meta
from dlpipe.packaging.meta import input_description
from dlpipe.packaging.registry import _is_local, registered_source, resolve_model_uri


def load_model_folder(folder: str | Path) -> Any:
    """The Keras model of a local MLflow model folder, its classes imported first."""
    import keras

    folder = Path(folder)
    meta = read_meta(folder)
    if meta:
        import_model_modules(meta.get("modules", []), folder)
    else:
        register_custom_objects()
    return keras.saving.load_model(folder / KERAS_FILE, compile=False)


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` gives for a dlpipe model (via
    :func:`_load_pyfunc`): ``predict(raw_inputs, params)`` returns a dict of arrays."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.model = load_model_folder(self.folder)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        return predict(self.model, self.meta, model_input, params)

    def get_raw_model(self) -> Any:
        """The Keras model (``PyFuncModel.get_raw_model()``)."""
        return self.model


def _load_pyfunc(path: str) -> PyfuncModel:
    """MLflow's entry point for the ``python_function`` flavour (``loader_module``)."""
    return PyfuncModel(path)


def download(uri: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """A local copy of the model at ``uri`` (a local path is used where it is)."""
    if _is_local(uri):
        return Path(uri)
    import mlflow

    if uri.startswith("models:/"):  # the registry of this store, not MLflow's default one
        uri = registered_source(uri, tracking_uri)
    dst = str(dst) if dst is not None else tempfile.mkdtemp(prefix="dlpipe-model-")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=dst))


def load_keras_model(uri: str, tracking_uri: str, dst: str | Path | None = None) -> Any:
    """The Keras model behind any model reference :func:`resolve_model_uri` accepts,
    with the modules of its classes imported first."""
    import keras

    local = download(resolve_model_uri(uri, tracking_uri), tracking_uri, dst)
    if local.is_dir():
        if (local / KERAS_FILE).is_file():
            return load_model_folder(local)
        found = sorted(local.rglob("*.keras"))
        if not found:
            raise DlpipeError(f"no .keras model file in {uri}")
        local = found[0]
    meta = read_meta(local.parent)
    if meta:
        import_model_modules(meta.get("modules", []), local.parent)
    else:
        register_custom_objects()
    return keras.saving.load_model(local, compile=False)


@dataclass
class Predictor:
    """A loaded model behind one call: ``predict(raw_inputs) -> {name: array}``.

    ``task`` is the architecture's task; ``mode`` says what ``predict`` does (see
    :data:`MODES`); ``input_description`` what it takes (``kind``, ``dtype``,
    ``shape`` with ``None`` for free sizes, and a sentence)."""

    task: str
    mode: str
    input_description: dict[str, Any]
    meta: dict[str, Any] = field(repr=False)
    uri: str = ""
    _model: Any = field(default=None, repr=False)

    def predict(self, raw_inputs: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        kind = self.input_description.get("kind")
        if self.meta and kind != "rows" and not hasattr(raw_inputs, "columns"):
            # Arrays and lists as the signature types them (MLflow checks dtypes strictly).
            dtype = str if kind == "text" else self.input_description["dtype"]
            raw_inputs = np.asarray(raw_inputs, dtype=dtype)
        out = self._model.predict(raw_inputs, params=params) if self.meta else None
        if out is None:  # a bare .keras file: inputs as the model takes them
            x = _as_array(raw_inputs, "table")
            out = {"output": _first(self._model.predict(x, verbose=0))}
        return {k: np.asarray(v) for k, v in dict(out).items()}


def load_predictor(uri: str, tracking_uri: str) -> Predictor:
    """Load a model for prediction from any reference :func:`resolve_model_uri`
    accepts. MLflow models go through ``mlflow.pyfunc`` (schema checks included); a
    bare ``.keras`` file predicts on inputs as the model takes them."""
    resolved = resolve_model_uri(uri, tracking_uri)
    local = download(resolved, tracking_uri)
    if local.is_dir() and (local / "MLmodel").is_file():
        import mlflow.pyfunc

        meta = read_meta(local)
        pyfunc = mlflow.pyfunc.load_model(str(local))
        return Predictor(meta.get("task", "generic"), meta.get("mode", "raw"),
                         input_description(meta), meta, resolved, pyfunc)
    model = load_keras_model(str(local), tracking_uri)
    shape = [None, *[int(d) if d is not None else None for d in model.inputs[0].shape[1:]]] \
        if getattr(model, "inputs", None) else [None]
    description = {"kind": "tensor", "dtype": "float32", "shape": shape,
                   "text": "inputs as the model takes them (normalized)"}
    return Predictor("generic", "raw", description, {}, resolved, model)
