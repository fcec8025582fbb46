"""Models that travel: the MLflow model dlpipe logs, and loading it anywhere.

A run that logs its model (``tracking.log_model``, the default) logs an *MLflow model*
under the artifact path ``model``:

======================  ================================================================
``MLmodel``             two flavours: ``keras`` (``mlflow.keras.load_model``) and
                        ``python_function`` (``mlflow.pyfunc.load_model``, ``mlflow
                        models serve``), the signature and the input example
``model.keras``         the trained model (``keras.saving.load_model``)
``dlpipe.json``         what ``predict`` needs: the task, the modules that define the
                        model's classes, the data stage's preprocessing, class names,
                        vocabularies
``saved_model/``        an inference-only TensorFlow SavedModel (no dlpipe, no Python
                        classes: ``tf.saved_model.load``), where the architecture exports
``model.onnx``          the same as ONNX, where ``tf2onnx`` is installed and converts it
``requirements.txt``    ``dlpipe==<version>``, tensorflow, keras (and MLflow's env files)
======================  ================================================================

The ``python_function`` flavour is this module (``loader_module: dlpipe.packaging``):
loading imports the modules that define the model's classes, then the model, so a
fresh process needs nothing but ``mlflow.pyfunc.load_model(uri)``. Its ``predict``
takes RAW inputs, as the data source had them (pixel values, feature tables, text) and
applies the data stage's resizing and normalization itself; what it returns per task is
in ``docs/using-models.md``.

The training process never imports MLflow: it writes the pieces into a folder
(:func:`stage_model`) and the tracking process assembles the MLflow model from them
(:func:`save_mlflow_model`). :func:`save_model` does both in one process.

Importing this module is cheap (no TensorFlow, no MLflow); the functions import what
they need.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError

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

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: The start of a run id (``dlpipe`` prints the first 8 characters).
_RUN_PREFIX = re.compile(r"^[0-9a-f]{6,31}$")


# --------------------------------------------------------------------------------------
# Custom classes
# --------------------------------------------------------------------------------------


def architecture_modules(plugin_dirs: list[str] | None = None) -> list[str]:
    """The modules that build every registered architecture (built-in plugins and
    installed entry-point plugins; ``plugin_dirs`` adds local plugin folders)."""
    from dlpipe.plugins import load_plugins

    host = load_plugins(plugin_dirs=plugin_dirs or [], entry_points=True)
    modules = set()
    for entry in host.registry.models.values():
        build = entry.build
        name = build.partition(":")[0] if isinstance(build, str) else getattr(build, "__module__", "")
        if name:
            modules.add(name)
    return sorted(modules)


def register_custom_objects(plugin_dirs: list[str] | None = None) -> list[str]:
    """Import the module of every registered architecture, so that its Keras classes
    are registered and ``keras.saving.load_model`` / ``mlflow.keras.load_model`` can
    rebuild any ``model.keras`` dlpipe saved. Returns the modules imported.

    One call is enough per process::

        import dlpipe.packaging, keras
        dlpipe.packaging.register_custom_objects()
        model = keras.saving.load_model("model/model.keras")
    """
    modules = architecture_modules(plugin_dirs)
    for name in modules:
        importlib.import_module(name)
    return modules


def _model_modules(model: Any) -> list[str]:
    """The non-Keras modules that define the classes inside ``model`` (itself, its
    layers, recursively)."""
    found: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        module = type(obj).__module__
        if not module.startswith(("keras", "tensorflow", "tf_keras", "builtins")) and module not in found:
            found.append(module)
        for child in getattr(obj, "layers", None) or []:
            visit(child)
        for value in list(vars(obj).values()):
            if _is_keras_layer(value):
                visit(value)

    visit(model)
    return found


def _is_keras_layer(obj: Any) -> bool:
    import keras

    return isinstance(obj, keras.layers.Layer)


def import_model_modules(modules: list[dict[str, str | None]], folder: Path | None = None) -> None:
    """Import the modules a saved model's classes come from (see :func:`describe`);
    a local plugin module is loaded from its copy under ``folder/code``."""
    for record in modules:
        name = str(record["name"])
        if name in sys.modules:
            continue
        code = record.get("file")
        if code and folder is not None and (folder / code).is_file():
            spec = importlib.util.spec_from_file_location(name, folder / code)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise DlpipeError(
                f"the model's classes are defined in module {name!r}, which cannot be "
                f"imported here ({exc}); install the plugin that provides it"
            ) from exc


# --------------------------------------------------------------------------------------
# Preprocessing: what the data stage did to the raw inputs
# --------------------------------------------------------------------------------------


@dataclass
class Preprocessing:
    """The data stage's resizing and normalization, to apply to raw inputs.

    ``method`` is ``none``, ``minmax``, ``standard`` (the data stages' ``normalize``)
    or ``unknown`` (it could not be recovered: inputs must then be given as the model
    saw them). ``low``/``high`` (minmax) and ``mean``/``std`` (standard) are the
    training split's statistics: one number for images, one per column for tables.
    ``image_size`` is ``[height, width]`` when the data stage resized images.
    """

    method: str = "none"
    target: tuple[float, float] = (0.0, 1.0)
    low: Any = None
    high: Any = None
    mean: Any = None
    std: Any = None
    image_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return np.asarray(v).tolist() if v is not None else None

        return {
            "method": self.method,
            "target": list(self.target),
            "low": plain(self.low),
            "high": plain(self.high),
            "mean": plain(self.mean),
            "std": plain(self.std),
            "image_size": list(self.image_size) if self.image_size else None,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> Preprocessing:
        if not doc:
            return cls()

        def array(v: Any) -> Any:
            return None if v is None else np.asarray(v, dtype=np.float32)

        size = doc.get("image_size")
        low, high = doc.get("target") or (0.0, 1.0)
        return cls(
            method=str(doc.get("method", "none")),
            target=(float(low), float(high)),
            low=array(doc.get("low")),
            high=array(doc.get("high")),
            mean=array(doc.get("mean")),
            std=array(doc.get("std")),
            image_size=(int(size[0]), int(size[1])) if size else None,
        )

    # The formulas of dlpipe.stages.data.loaders.normalize, and their inverses.
    def _minmax_scale(self) -> Any:
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return (self.target[1] - self.target[0]) / span

    def _std(self) -> Any:
        return np.where(self.std > 0, self.std, 1.0)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.method == "minmax":
            out = (x - self.low) * self._minmax_scale() + self.target[0]
        elif self.method == "standard":
            out = (x - self.mean) / self._std()
        else:
            out = x
        return np.asarray(out, dtype=np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Model-scale values (reconstructions, samples) back in the raw units."""
        if self.method == "minmax":
            out = (x - self.target[0]) / self._minmax_scale() + self.low
        elif self.method == "standard":
            out = x * self._std() + self.mean
        else:
            out = x
        return np.asarray(out, dtype=np.float32)

    def resize(self, x: np.ndarray) -> np.ndarray:
        """Images resized to ``image_size`` as the data stage did (bilinear, antialiased)."""
        if self.image_size is None or x.ndim != 4 or tuple(x.shape[1:3]) == self.image_size:
            return x
        from dlpipe.stages.data.loaders import resize_images

        return resize_images(x, self.image_size)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return self.normalize(self.resize(np.asarray(raw, dtype=np.float32)))


def _data_stage(ctx: Any) -> Any:
    """The data stage whose bundle the model was trained on."""
    stages = list(ctx.spec.stages)
    if ctx.stage is not None:
        stages = stages[: ctx.stage.index]
    return next((s for s in reversed(stages) if s.kind == "data"), None)


def preprocessing_of(ctx: Any, data: Any) -> Preprocessing:
    """What the run's data stage did to its raw inputs.

    A bundle that records it (``data.preprocessing``, a :meth:`Preprocessing.to_dict`
    dict) says so. Otherwise it is recovered from the data stage's params: the stage
    runs again with ``normalize: none`` to get the raw training split, whose
    statistics are what the normalization used; the result is checked against the
    bundle the model was trained on.
    """
    recorded = getattr(data, "preprocessing", None)
    if isinstance(recorded, Mapping):
        return Preprocessing.from_dict(recorded)
    stage = _data_stage(ctx) if ctx is not None else None
    params = getattr(stage, "params", None)
    method = getattr(params, "normalize", None)
    if stage is None or method is None:
        return Preprocessing()  # no normalization option: the inputs are the raw data
    size = getattr(params, "image_size", None)
    target = tuple(float(v) for v in getattr(params, "value_range", (0.0, 1.0)))
    image_size = (int(size[0]), int(size[1])) if size else None
    if method == "none":
        return Preprocessing("none", target, image_size=image_size)  # type: ignore[arg-type]
    try:
        raw = _rerun_without_normalization(ctx, stage)
        prep = _fit(method, target, raw.x["train"], image_size)  # type: ignore[arg-type]
        _check_recovered(prep, raw, data)
    except Exception as exc:  # the model still logs; predict then takes model-scale inputs
        print(f"packaging: could not recover the data stage's normalization ({exc}); the "
              "logged model takes inputs already normalized", flush=True)
        return Preprocessing("unknown", target, image_size=image_size)  # type: ignore[arg-type]
    return prep


def _rerun_without_normalization(ctx: Any, stage: Any) -> Any:
    entry = ctx.plugins.registry.lookup_stage("data", stage.use)
    with tempfile.TemporaryDirectory(prefix="dlpipe-raw-") as folder:
        stub = SimpleNamespace(
            spec=ctx.spec, plugins=ctx.plugins, run_dir=Path(folder), stage=stage,
            seed=ctx.seed, smoke=getattr(ctx, "smoke", False), data=None, model=None,
            models={}, extras={}, tags={}, metrics={}, strategy=getattr(ctx, "strategy", None),
            log_artifact=lambda *a, **k: None, log_metrics=lambda *a, **k: None,
            log_figure=lambda *a, **k: None, hook=SimpleNamespace(),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            entry.function()(stub, stage.params.model_copy(update={"normalize": "none"}))
    if stub.data is None:
        raise DlpipeError(f"data stage {stage.use!r} set no data")
    return stub.data


def _fit(method: str, target: tuple[float, float], train: np.ndarray,
         image_size: tuple[int, int] | None) -> Preprocessing:
    train = np.asarray(train, dtype=np.float32)
    axis = None if train.ndim == 4 else 0
    prep = Preprocessing(method, target, image_size=image_size)
    if method == "minmax":
        prep.low, prep.high = np.min(train, axis=axis), np.max(train, axis=axis)
    elif method == "standard":
        prep.mean, prep.std = np.mean(train, axis=axis), np.std(train, axis=axis)
    else:
        raise DlpipeError(f"unknown normalization {method!r}")
    return prep


def _check_recovered(prep: Preprocessing, raw: Any, data: Any) -> None:
    """The recovered normalization maps the raw data onto what the model trained on."""
    for split in ("test", "train"):
        n = min(64, len(raw.x.get(split, ())), len(data.x.get(split, ())))
        if n:
            got = prep.normalize(np.asarray(raw.x[split][:n], dtype=np.float32))
            want = np.asarray(data.x[split][:n], dtype=np.float32)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise DlpipeError(f"re-running the data stage gave other {split} data")
            return
    raise DlpipeError("the data has no examples to check against")


# --------------------------------------------------------------------------------------
# What a model predicts: one "mode" per kind of model
# --------------------------------------------------------------------------------------

#: What ``predict`` takes and returns per mode (also in docs/using-models.md).
MODES = {
    "classify": "raw images or feature rows -> probabilities, label, class_name",
    "classify_text": "texts -> probabilities, label, class_name",
    "regress": "raw feature rows -> prediction",
    "segment": "raw images -> mask (class per pixel), probabilities",
    "detect": "raw images -> boxes, scores, classes (after NMS, padded with -1), count",
    "reconstruct": "raw images or rows -> reconstruction (raw units)",
    "upscale": "raw low-resolution images -> image (raw units, scale x larger)",
    "sample": "class ids (conditional) or any values (one row per sample) -> samples (raw units)",
    "translate": "texts -> text (greedy decoding), token_ids",
    "caption": "raw images -> text (greedy decoding), token_ids",
    "embed": "raw images -> image_embedding (L2-normalized)",
    "raw": "inputs as the model takes them -> output (the model's own output)",
}


def predict_mode(task: str, model: Any) -> str:
    """How :func:`predict` uses a model of this task and class."""

    def has(name: str) -> bool:
        return callable(getattr(model, name, None))

    if has("caption"):
        return "caption"
    if has("encode_images"):
        return "embed"
    if task == "seq2seq":
        return "translate"
    if task == "classification":
        return "classify"
    if task == "regression":
        return "regress"
    if task == "segmentation":
        return "segment"
    if task == "detection" and has("detect"):
        return "detect"
    if has("upscale"):
        return "upscale"
    codec = getattr(model, "encoder", None) is not None and getattr(model, "decoder", None) is not None
    if has("generate_samples") and (
        has("to_diffusion") or getattr(model, "conditional", False) or not codec
    ):
        return "sample"
    if task in ("generative", "autoencoder", "reconstruction") and codec:
        return "reconstruct"
    return "raw"


def _vocab_dict(vocab: Any) -> dict[str, Any] | None:
    return None if vocab is None else vocab.to_dict()


def _vocab(doc: Mapping[str, Any] | None) -> Any:
    if doc is None:
        raise DlpipeError("the saved model has no vocabulary")
    from dlpipe.datasets.captions import vocabulary_from_dict

    return vocabulary_from_dict(dict(doc))


def describe(model: Any, data: Any, entry: Any = None, ctx: Any = None) -> dict[str, Any]:
    """The ``dlpipe.json`` of a model trained on ``data`` (a :class:`DataBundle`)."""
    task = getattr(entry, "task", None) or getattr(data, "task", None) or "generic"
    text_input = np.asarray(data.x["train"]).dtype.kind in "iu" and task != "seq2seq"
    mode = predict_mode(task, model)
    if mode == "classify" and text_input:
        mode = "classify_text"
    encoder = table_encoder(data)
    if encoder is not None or mode in ("classify_text", "translate"):
        prep = Preprocessing()  # the encoder (or the vocabulary) does it all
    else:
        prep = preprocessing_of(ctx, data)
    modules = []
    for name in _model_modules(model):
        record: dict[str, str | None] = {"name": name, "file": None}
        if name.startswith("dlpipe_local_plugins."):
            record["file"] = f"{CODE_DIR}/{name.rpartition('.')[2]}.py"
        modules.append(record)
    build = getattr(entry, "build", None)
    if isinstance(build, str) and not any(m["name"] == build.partition(":")[0] for m in modules):
        modules.append({"name": build.partition(":")[0], "file": None})
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dlpipe_version": _version("dlpipe"),
        "architecture": getattr(entry, "name", None),
        "task": task,
        "mode": mode,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "modules": modules,
        "preprocessing": prep.to_dict(),
        "model_input_shape": list(getattr(data, "input_shape", ()) or ()),
        "value_range": list(getattr(data, "value_range", (0.0, 1.0))),
        "class_names": [str(c) for c in (getattr(data, "class_names", None) or [])],
        "num_classes": getattr(data, "num_classes", None),
    }
    if encoder is not None:
        meta["table_encoder"] = {
            "class": f"{type(encoder).__module__}:{type(encoder).__qualname__}",
            "state": encoder.to_dict(),
        }
    if mode == "translate":
        meta["source_vocab"] = _vocab_dict(getattr(data, "source_vocab", None))
        meta["target_vocab"] = _vocab_dict(getattr(data, "target_vocab", None))
        meta["source_length"] = int(data.x["train"].shape[1])
    elif mode == "classify_text":
        vocab = getattr(data, "vocab", None) or getattr(data, "source_vocab", None)
        meta["source_vocab"] = _vocab_dict(vocab)
        meta["source_length"] = int(data.x["train"].shape[1])
    elif mode == "caption":
        meta["target_vocab"] = _vocab_dict(getattr(data, "vocab", None))
    elif mode == "sample":
        meta["conditional"] = bool(getattr(model, "conditional", False))
    elif mode == "upscale":
        meta["scale"] = int(getattr(model, "scale", 1))
    return meta


def input_description(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What ``predict`` expects: ``{"kind", "dtype", "shape", "text"}``."""
    mode = meta.get("mode", "raw")
    prep = Preprocessing.from_dict(meta.get("preprocessing"))
    shape = [None, *meta.get("model_input_shape", [])]
    if "table_encoder" in meta:
        state = meta["table_encoder"]["state"]
        return {"kind": "rows", "dtype": "mixed", "shape": [None, len(state["columns"])],
                "columns": list(state["columns"]),
                "categorical": sorted(state.get("categories", {})),
                "text": "raw rows: a DataFrame (or a list of dicts) with the feature "
                        f"columns {', '.join(state['columns'])}"}
    if mode in ("translate", "classify_text"):
        return {"kind": "text", "dtype": "str", "shape": [None],
                "text": "one string per row (the source text)"}
    if mode == "sample":
        what = ("one class id per sample" if meta.get("conditional")
                else "one row per sample (values are ignored)")
        return {"kind": "labels", "dtype": "int64", "shape": [None], "text": what}
    if len(shape) == 4:
        if prep.image_size is not None:
            shape[1:3] = [None, None]
        if mode == "upscale":
            scale = int(meta.get("scale", 1))
            shape[1:3] = [None if s is None else s // scale for s in shape[1:3]]
        units = ("as the model saw them (normalized)" if prep.method == "unknown"
                 else "raw pixel values, as the data source had them")
        resize = f"; resized to {list(prep.image_size)}" if prep.image_size else ""
        return {"kind": "image", "dtype": "float64", "shape": shape,
                "text": f"images (batch, height, width, channels), {units}{resize}"}
    units = "normalized" if prep.method == "unknown" else "raw"
    return {"kind": "table", "dtype": "float64", "shape": shape,
            "text": f"{units} feature rows (batch, features), columns in training order"}


def table_encoder(data: Any) -> Any:
    """The bundle's encoder of raw table rows (the ``csv`` stage's
    ``TablePreprocessing``: ``encode(rows)``, ``to_dict()``), if it has one."""
    encoder = getattr(data, "preprocessing", None)
    if callable(getattr(encoder, "encode", None)) and callable(getattr(encoder, "to_dict", None)):
        return encoder
    return None


def _load_encoder(meta: Mapping[str, Any]) -> Any:
    record = meta["table_encoder"]
    module, _, name = str(record["class"]).partition(":")
    return getattr(importlib.import_module(module), name).from_dict(record["state"])


def _rows(raw: Any) -> list[dict[str, Any]]:
    """Raw table rows from a DataFrame, a dict of columns or a list of dicts."""
    if hasattr(raw, "to_dict") and hasattr(raw, "columns"):  # a pandas DataFrame
        return list(raw.to_dict(orient="records"))
    if isinstance(raw, Mapping):
        columns = {k: list(np.ravel(np.asarray(v, dtype=object))) for k, v in raw.items()}
        n = len(next(iter(columns.values()), []))
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return [dict(row) for row in np.ravel(np.asarray(raw, dtype=object))]


def decode_rows(meta: Mapping[str, Any], x: np.ndarray) -> list[dict[str, Any]]:
    """Raw rows back from encoded inputs (for the input example): numbers unscaled,
    one-hot groups as their category (empty where none is set)."""
    state = meta["table_encoder"]["state"]
    categories = state.get("categories", {})
    rows: list[dict[str, Any]] = [{} for _ in range(len(x))]
    at = 0
    for column in state["columns"]:
        if column in categories:
            names = categories[column]
            block = np.asarray(x[:, at : at + len(names)])
            for row, values in zip(rows, block, strict=True):
                row[column] = names[int(values.argmax())] if len(names) and values.max() > 0 else ""
            at += len(names)
        else:
            values = x[:, at] * float(state["scale"][column]) + float(state["center"][column])
            for row, value in zip(rows, values, strict=True):
                row[column] = float(value)
            at += 1
    return rows


def _as_array(raw: Any, kind: str) -> np.ndarray:
    """``raw`` (array, list, DataFrame) as the NumPy array a mode works on."""
    if hasattr(raw, "to_numpy") and hasattr(raw, "columns"):  # a pandas DataFrame
        one_column = kind in ("text", "labels")
        raw = raw.iloc[:, 0].to_numpy() if one_column else raw.to_numpy()
    if kind == "text":
        return np.asarray([str(t) for t in np.ravel(np.asarray(raw, dtype=object))], dtype=object)
    if kind == "labels":
        return np.ravel(np.asarray(raw)).astype(np.int64)
    return np.asarray(raw, dtype=np.float32)


def _first(out: Any) -> np.ndarray:
    if isinstance(out, Mapping):
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out)


def _encode_texts(texts: np.ndarray, vocab: Any, length: int) -> np.ndarray:
    ids = np.zeros((len(texts), length), dtype=np.int32)
    for row, text in enumerate(texts):
        tokens = vocab.encode(str(text))
        if len(tokens) > length:
            raise DlpipeError(f"{text!r} has {len(tokens)} tokens; the model takes at most {length}")
        ids[row, : len(tokens)] = tokens
    return ids


def _classes(probs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    label = probs.argmax(axis=-1).astype(np.int64)
    out = {"probabilities": probs.astype(np.float32), "label": label}
    if names:
        out["class_name"] = np.asarray([names[i] if i < len(names) else str(i) for i in label])
    return out


def predict(model: Any, meta: Mapping[str, Any], raw: Any,
            params: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """What a dlpipe model predicts for raw inputs (see :data:`MODES`)."""
    import keras

    mode = meta.get("mode", "raw")
    kind = input_description(meta)["kind"]
    x = _load_encoder(meta).encode(_rows(raw)) if kind == "rows" else _as_array(raw, kind)
    prep = Preprocessing.from_dict(meta.get("preprocessing"))
    names = list(meta.get("class_names") or [])
    params = dict(params or {})

    def run(inputs: np.ndarray) -> np.ndarray:
        return _first(model.predict(inputs, verbose=0, batch_size=256))

    if mode == "classify":
        return _classes(run(prep.apply(x)), names)
    if mode == "classify_text":
        ids = _encode_texts(x, _vocab(meta.get("source_vocab")), int(meta["source_length"]))
        return _classes(run(ids), names)
    if mode == "regress":
        return {"prediction": run(prep.apply(x)).astype(np.float32)}
    if mode == "segment":
        probs = run(prep.apply(x)).astype(np.float32)
        return {"mask": probs.argmax(axis=-1).astype(np.int32), "probabilities": probs}
    if mode == "detect":
        return _detections(model, prep.apply(x), params)
    if mode == "reconstruct":
        return {"reconstruction": prep.denormalize(run(prep.apply(x)))}
    if mode == "upscale":
        low, high = (float(v) for v in meta.get("value_range", (0.0, 1.0)))
        out = keras.ops.convert_to_numpy(model.upscale(prep.normalize(x)))
        return {"image": prep.denormalize(np.clip(out, low, high))}
    if mode == "sample":
        seed = int(params.get("seed", 0))
        labels = x if meta.get("conditional") else None
        samples = model.generate_samples(len(x), labels=labels, seed=seed)
        return {"samples": prep.denormalize(np.asarray(samples, dtype=np.float32))}
    if mode == "translate":
        # (imported by name: mypy need not check the model code from here)
        greedy_decode = importlib.import_module("dlpipe.models.decoding").greedy_decode
        ids = _encode_texts(x, _vocab(meta.get("source_vocab")), int(meta["source_length"]))
        out = greedy_decode(model, ids)
        target = _vocab(meta.get("target_vocab"))
        return {"text": np.asarray([target.decode(row) for row in out]), "token_ids": out}
    if mode == "caption":
        out = model.caption(prep.apply(x))
        vocab = _vocab(meta.get("target_vocab"))
        return {"text": np.asarray([vocab.decode(row) for row in out]), "token_ids": out}
    if mode == "embed":
        emb = keras.ops.convert_to_numpy(model.encode_images(prep.apply(x), training=False))
        return {"image_embedding": np.asarray(emb, dtype=np.float32)}
    return {"output": run(prep.apply(x) if kind in ("image", "table", "rows") else x)}


def _detections(model: Any, x: np.ndarray, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    most = int(params.get("max_detections", 20))
    found = model.detect(
        x, score_threshold=float(params.get("score_threshold", 0.05)),
        iou_threshold=float(params.get("iou_threshold", 0.5)), max_detections=most,
    )
    n = len(found)
    boxes = np.full((n, most, 4), -1.0, dtype=np.float32)
    scores = np.full((n, most), -1.0, dtype=np.float32)
    classes = np.full((n, most), -1, dtype=np.int32)
    count = np.zeros(n, dtype=np.int32)
    for i, det in enumerate(found):
        k = min(most, len(det.scores))
        boxes[i, :k], scores[i, :k], classes[i, :k], count[i] = (
            det.boxes[:k], det.scores[:k], det.classes[:k], k)
    return {"boxes": boxes, "scores": scores, "classes": classes, "count": count}


def example_inputs(model: Any, data: Any, meta: Mapping[str, Any], n: int = EXAMPLE_ROWS) -> np.ndarray:
    """A few raw inputs from the test split (the logged input example)."""
    import keras

    mode = meta.get("mode")
    split = "test" if data.size("test") else "train"
    prep = Preprocessing.from_dict(meta.get("preprocessing"))
    if mode in ("translate", "classify_text"):
        texts = data.texts[split]
        sources = texts[0] if isinstance(texts, tuple) else texts
        return np.asarray([str(t) for t in list(sources)[:n]], dtype=str)
    if mode == "sample":
        k = int(meta.get("num_classes") or 1)
        return (np.arange(n) % k).astype(np.int64)
    x = np.asarray(data.x[split][:n], dtype=np.float32)
    if "table_encoder" in meta:
        return np.asarray(decode_rows(meta, x), dtype=object)
    if mode == "upscale":
        x = keras.ops.convert_to_numpy(model.downsample(x))
    # Raw numbers are float64, as NumPy and pandas make them (and the signature says).
    return (prep.denormalize(x) if prep.method != "unknown" else x).astype(np.float64)


def signature_params(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inference params the pyfunc model accepts (``predict(x, params={...})``)."""
    if meta.get("mode") == "sample":
        return {"seed": 0}
    if meta.get("mode") == "detect":
        return {"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 20}
    return None


# --------------------------------------------------------------------------------------
# Inference-only exports: TF SavedModel, ONNX
# --------------------------------------------------------------------------------------


def _serving_function(model: Any, meta: Mapping[str, Any]) -> tuple[Any, Any] | None:
    """``(fn, input_specs)`` of the exported endpoint (raw inputs in, as ``predict``
    but without text, NMS or sampling loops), or ``None`` where the mode has no graph
    form."""
    import tensorflow as tf

    mode = meta.get("mode")
    prep = Preprocessing.from_dict(meta.get("preprocessing"))
    if prep.method == "unknown":
        return None
    shape = [None, *meta.get("model_input_shape", [])]
    image = len(shape) == 4

    def constant(v: Any) -> Any:
        return tf.constant(np.asarray(v, dtype=np.float32))

    def normalize(x: Any) -> Any:
        if image and prep.image_size is not None:
            size = list(prep.image_size)
            x = tf.cond(
                tf.reduce_all(tf.equal(tf.shape(x)[1:3], size)),
                lambda: x,
                lambda: tf.image.resize(x, size, method="bilinear", antialias=True),
            )
        if prep.method == "minmax":
            return (x - constant(prep.low)) * constant(prep._minmax_scale()) + prep.target[0]
        if prep.method == "standard":
            return (x - constant(prep.mean)) / constant(prep._std())
        return x

    def denormalize(x: Any) -> Any:
        if prep.method == "minmax":
            return (x - prep.target[0]) / constant(prep._minmax_scale()) + constant(prep.low)
        if prep.method == "standard":
            return x * constant(prep._std()) + constant(prep.mean)
        return x

    def first(out: Any) -> Any:
        return out[0] if isinstance(out, (list, tuple)) else out

    if image and prep.image_size is not None:
        shape[1:3] = [None, None]
    spec = [tf.TensorSpec(shape, tf.float32, name="inputs")]
    if mode in ("classify", "segment", "detect"):
        return (lambda x: first(model(normalize(x), training=False))), spec
    if mode == "reconstruct":
        return (lambda x: denormalize(first(model(normalize(x), training=False)))), spec
    if mode == "upscale":
        low, high = (float(v) for v in meta.get("value_range", (0.0, 1.0)))
        shape[1:3] = [None, None]
        spec = [tf.TensorSpec(shape, tf.float32, name="inputs")]
        return (lambda x: denormalize(tf.clip_by_value(model.upscale(normalize(x)), low, high))), spec
    if mode == "embed":
        return (lambda x: model.encode_images(normalize(x), training=False)), spec
    if mode == "caption" and hasattr(model, "greedy_probabilities"):
        # Greedy decoding in the graph: token probabilities; argmax gives the ids.
        return (lambda x: model.greedy_probabilities(normalize(x))), spec
    if mode in ("translate", "classify_text") and "source_length" in meta:
        ids = [tf.TensorSpec([None, int(meta["source_length"])], tf.int32, name="token_ids")]
        return (lambda x: first(model(x, training=False))), ids
    generate = getattr(model, "generate", None) or getattr(model, "decode", None)
    latent_dim = getattr(model, "latent_dim", None)
    if mode == "sample" and callable(generate) and latent_dim and not hasattr(model, "to_diffusion"):
        # A GAN's generator or a conditional VAE's decoder: latent vectors (and class
        # ids) in, samples in raw units out.
        low, high = (float(v) for v in meta.get("value_range", (0.0, 1.0)))
        z = tf.TensorSpec([None, int(latent_dim)], tf.float32, name="z")

        def samples(z: Any, labels: Any = None) -> Any:
            out = tf.cast(generate(z, labels, training=False), tf.float32)
            return denormalize(tf.clip_by_value(out, low, high))

        if meta.get("conditional"):
            return samples, [z, tf.TensorSpec([None], tf.int32, name="labels")]
        return (lambda z: samples(z)), [z]
    return None


def export_saved_model(model: Any, meta: Mapping[str, Any], path: Path) -> str | None:
    """Write an inference-only TF SavedModel with one endpoint, ``serve``; returns
    ``None``, or why the model does not export."""
    import keras

    found = _serving_function(model, meta)
    if found is None:
        return f"mode {meta.get('mode')!r} has no graph form (it decodes or samples in Python)"
    fn, specs = found
    archive = keras.export.ExportArchive()
    try:
        archive.track(model)
        archive.add_endpoint(name="serve", fn=fn, input_signature=specs)
        with contextlib.redirect_stdout(io.StringIO()):
            archive.write_out(str(path), verbose=False)
    except Exception as exc:
        shutil.rmtree(path, ignore_errors=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def export_onnx(model: Any, meta: Mapping[str, Any], path: Path) -> str | None:
    """The ``serve`` endpoint of :func:`export_saved_model` as ONNX, converted by
    tf2onnx (the optional ``onnx`` extra); returns ``None``, or why not."""
    try:
        import tf2onnx
    except ImportError:
        return "tf2onnx is not installed (pip install 'dlpipe[onnx]')"
    import tensorflow as tf

    found = _serving_function(model, meta)
    if found is None:
        return f"mode {meta.get('mode')!r} has no graph form"
    fn, specs = found
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tf2onnx.convert.from_function(
                tf.function(fn), input_signature=specs, output_path=str(path)
            )
        _check_onnx(path)
    except Exception as exc:
        Path(path).unlink(missing_ok=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def _check_onnx(path: Path) -> None:
    """tf2onnx sometimes writes a graph ONNX Runtime refuses (a ``Bitcast`` node, say):
    open it with ONNX Runtime when installed, else run ONNX's checker."""
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(str(path))
        return
    onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------
# Writing the model: the training process's part, then MLflow's
# --------------------------------------------------------------------------------------


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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


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
            loader_module=__name__,
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


# --------------------------------------------------------------------------------------
# Loading: the pyfunc flavour, URIs, predictors
# --------------------------------------------------------------------------------------


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``dlpipe.json`` of a local model folder (``{}`` when there is none)."""
    file = Path(folder) / META_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


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


def download(uri: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """A local copy of the model at ``uri`` (a local path is used where it is)."""
    if _is_local(uri):
        return Path(uri)
    import mlflow

    if uri.startswith("models:/"):  # the registry of this store, not MLflow's default one
        uri = registered_source(uri, tracking_uri)
    dst = str(dst) if dst is not None else tempfile.mkdtemp(prefix="dlpipe-model-")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=dst))


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


# --------------------------------------------------------------------------------------
# The model registry
# --------------------------------------------------------------------------------------


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


