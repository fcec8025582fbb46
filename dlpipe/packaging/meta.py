"""What a model's ``dlpipe.json`` says: its task and predict mode, the modules of its
classes, its preprocessing and vocabularies, and the inputs ``predict`` takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dlpipe.packaging.classes import _model_modules
from dlpipe.packaging.layout import CODE_DIR, FORMAT_VERSION, _version
from dlpipe.packaging.preprocessing import Preprocessing, preprocessing_of

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


def signature_params(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inference params the pyfunc model accepts (``predict(x, params={...})``)."""
    if meta.get("mode") == "sample":
        return {"seed": 0}
    if meta.get("mode") == "detect":
        return {"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 20}
    return None
