"""Writing the model: the training process stages the pieces (:func:`stage_model`), the
tracking process assembles the MLflow model (:func:`save_mlflow_model`)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.packaging.export import export_onnx, export_saved_model
from dlpipe.packaging.inference import example_inputs, predict
from dlpipe.packaging.layout import (
    _EXAMPLE_FILE,
    CODE_DIR,
    KERAS_FILE,
    META_FILE,
    ONNX_FILE,
    SAVED_MODEL_DIR,
    _version,
)
from dlpipe.packaging.meta import describe, input_description, signature_params

#: The ``loader_module`` every saved ``MLmodel`` records for the ``python_function``
#: flavour: MLflow imports it and calls its ``_load_pyfunc`` (defined in
#: :mod:`dlpipe.packaging.loading`, imported by the package), so it must stay this path
#: for models saved earlier to load.
LOADER_MODULE = "dlpipe.packaging"


def stage_model(
    model: Any,
    keras_file: str | Path,
    folder: str | Path,
    data: Any,
    entry: Any = None,
    ctx: Any = None,
    export: bool = True,
) -> Path:
    """Write everything :func:`save_mlflow_model` needs into ``folder`` (no MLflow
    here): ``model.keras``, ``dlpipe.json``, the raw input example with the model's
    outputs for it, the SavedModel (``export``) and local plugin code."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(keras_file, folder / KERAS_FILE)
    meta = describe(model, data, entry, ctx)
    for record in meta["modules"]:
        if record["file"]:
            source = getattr(sys.modules.get(str(record["name"])), "__file__", None)
            if source:
                (folder / CODE_DIR).mkdir(exist_ok=True)
                shutil.copyfile(source, folder / str(record["file"]))
    example = example_inputs(model, data, meta)
    outputs = predict(model, meta, example, signature_params(meta))
    arrays: dict[str, Any] = {"input": example, **{f"output.{k}": v for k, v in outputs.items()}}
    np.savez(folder / _EXAMPLE_FILE, **arrays)
    meta["input"] = input_description(meta)
    meta["outputs"] = sorted(outputs)
    exports: dict[str, str] = {}
    if export:
        why = export_saved_model(model, meta, folder / SAVED_MODEL_DIR)
        exports["saved_model"] = why or "ok"
        if why is None:
            why = export_onnx(model, meta, folder / ONNX_FILE)
            exports["onnx"] = why or "ok"
    meta["exports"] = exports
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return folder


def pip_requirements() -> list[str]:
    """What the logged model needs installed: dlpipe at this version, TensorFlow, Keras."""
    reqs = []
    for dist in ("dlpipe", "tensorflow", "keras"):
        version = _version(dist)
        reqs.append(f"{dist}=={version}" if version else dist)
    return reqs


def _signature(staged: Path, meta: Mapping[str, Any]) -> Any:
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    with np.load(staged / _EXAMPLE_FILE, allow_pickle=True) as examples:
        example = examples["input"]
        outputs = {k.partition(".")[2]: examples[k] for k in examples.files if k.startswith("output.")}
    described = meta["input"]
    if described["kind"] == "rows":  # raw table rows: one typed column each
        import pandas as pd

        example = pd.DataFrame(list(example), columns=described["columns"])
        categorical = set(described["categorical"])
        inputs = Schema([ColSpec("string" if c in categorical else "double", c)
                         for c in described["columns"]])
    else:
        shape = tuple(-1 if s is None else int(s) for s in described["shape"])
        dtype = np.dtype(str) if described["kind"] == "text" else np.dtype(described["dtype"])
        inputs = Schema([TensorSpec(dtype, shape)])
        if described["kind"] == "text":
            example = example.astype(str)
    inferred = infer_signature(example, outputs, params=signature_params(meta))
    return ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params), example


def save_mlflow_model(staged: str | Path, path: str | Path) -> Path:
    """Assemble the MLflow model at ``path`` (which must not exist) from what
    :func:`stage_model` wrote: the ``keras`` and ``python_function`` flavours over one
    ``model.keras``, signature, input example and requirements."""
    from mlflow.models import Model
    from mlflow.pyfunc import save_model as save_pyfunc

    staged, path = Path(staged), Path(path)
    meta = json.loads((staged / META_FILE).read_text())
    signature, example = _signature(staged, meta)
    mlflow_model = Model()
    # The Keras flavour reads <path>/<data>/model.keras: data "." is this folder.
    mlflow_model.add_flavor(
        "keras", keras_version=_version("keras"), data=".", save_exported_model=False
    )
    with _quiet_mlflow():  # its INFO line about checking the example
        save_pyfunc(
            str(path),
            loader_module=LOADER_MODULE,
            mlflow_model=mlflow_model,
            signature=signature,
            input_example=(example, signature_params(meta)) if signature_params(meta) else example,
            pip_requirements=pip_requirements(),
        )
    for name in (KERAS_FILE, META_FILE, ONNX_FILE):
        if (staged / name).is_file():
            shutil.copyfile(staged / name, path / name)
    for name in (SAVED_MODEL_DIR, CODE_DIR):
        if (staged / name).is_dir():
            shutil.copytree(staged / name, path / name)
    return path


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_model(
    model: Any,
    data: Any,
    path: str | Path,
    entry: Any = None,
    ctx: Any = None,
    export: bool = True,
) -> Path:
    """Save ``model`` (trained on ``data``) as the MLflow model a run logs, in one
    process: what the conformance test does for every architecture."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="dlpipe-model-") as tmp:
        keras_file = Path(tmp) / KERAS_FILE
        model.save(keras_file)
        staged = stage_model(model, keras_file, Path(tmp) / "staged", data, entry, ctx, export)
        return save_mlflow_model(staged, path)
