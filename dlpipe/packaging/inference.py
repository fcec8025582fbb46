"""Prediction on raw inputs, one way per predict mode (:data:`MODES`), and the raw
input example a model is logged with."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.packaging.layout import EXAMPLE_ROWS
from dlpipe.packaging.meta import input_description
from dlpipe.packaging.preprocessing import Preprocessing


def _vocab(doc: Mapping[str, Any] | None) -> Any:
    if doc is None:
        raise DlpipeError("the saved model has no vocabulary")
    from dlpipe.datasets.vocab import vocabulary_from_dict

    return vocabulary_from_dict(dict(doc))


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
