"""``oversample`` and ``class_weight`` for ``keras_fit``: a rebalanced training split
and per-example weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.losses import balanced_class_weights, class_weight_list


def _class_labels(data: Any, what: str) -> np.ndarray:
    y = data.y.get("train")
    if data.task != "classification" or y is None or np.ndim(y) != 1 or not data.num_classes:
        raise DlpipeError(
            f"{what} needs a classification data stage with one integer label per example"
        )
    return np.asarray(y).astype(np.int64)


def oversample_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices that repeat examples of the smaller classes (drawn with replacement, from
    a seeded generator) until every class present has as many as the largest one. All
    original examples are kept; the result is shuffled."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(counts.max())
    parts = []
    for cls, count in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == cls)
        extra = rng.choice(members, size=target - int(count), replace=True)
        parts.extend([members, extra])
    return rng.permutation(np.concatenate(parts))


def balanced_training_data(data: Any, params: Any, seed: int) -> Any:
    """The bundle with its training split oversampled and/or class-weighted.

    Class weights become per-example weights (what ``fit(class_weight=...)`` does
    inside Keras), multiplied with the data's own sample weights; 'balanced' is
    computed from the labels the model trains on (after oversampling).
    """
    if not params.oversample and params.class_weight is None:
        return data
    what = "oversample" if params.oversample else "class_weight"
    labels = _class_labels(data, what)
    x, y = data.x["train"], data.y["train"]
    w = data.weights.get("train")
    if params.oversample:
        index = oversample_indices(labels, seed)
        x, y, labels = x[index], y[index], labels[index]
        w = None if w is None else w[index]
        counts = np.bincount(labels, minlength=data.num_classes)
        print(f"train: oversampled the training split to {len(index)} examples "
              f"({', '.join(str(int(c)) for c in counts)} per class)")
    if params.class_weight is not None:
        if params.class_weight == "balanced":
            per_class = balanced_class_weights(labels, data.num_classes)
        else:
            try:
                per_class = class_weight_list(params.class_weight, data.num_classes, data.class_names)
            except ValueError as exc:
                raise DlpipeError(f"class_weight: {exc}") from exc
        print("train: class weights " + ", ".join(f"{c}={v:.3g}" for c, v in enumerate(per_class)))
        by_class = np.asarray(per_class, dtype=np.float32)[labels]
        w = by_class if w is None else np.asarray(w, dtype=np.float32) * by_class
    return dataclasses.replace(
        data,
        x={**data.x, "train": x},
        y={**data.y, "train": y},
        weights={**data.weights, "train": w},
    )
