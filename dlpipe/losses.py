"""Classification losses with label smoothing, focal modulation and class weights.

Keras ships cross-entropy for integer ("sparse") and one-hot targets, and focal
losses for binary and one-hot targets, but not every combination: label smoothing
needs one-hot targets, so ``sparse_categorical_crossentropy`` cannot smooth, and there
is no sparse focal loss. This module writes the whole family as two small losses on
``keras.ops``, one formula each.

**Categorical** (softmax outputs ``p``, targets ``t`` as class ids or one-hot rows)::

    t'   = (1 - s) * t + s / C                          # label smoothing s, C classes
    loss = -sum_c  alpha * (1 - p_c)^gamma * t'_c * log(p_c)
    loss = loss * w[y]                                  # per-class weight of the true class

With ``gamma = 0`` and ``alpha = 1`` this is the ordinary cross-entropy. The focal
factor ``(1 - p_c)^gamma`` (Lin et al., 2017) shrinks the loss of examples the model
already gets right with confidence, so training concentrates on the hard ones.

**Binary** (sigmoid outputs ``p`` of shape ``(n, 1)`` or ``(n, k)`` for k independent
labels, targets 0/1)::

    t'   = (1 - s) * t + s / 2
    loss = -[ alpha (1-p)^gamma t' log p  +  (1-alpha) p^gamma (1-t') log(1-p) ]
    loss = loss * (w[1] t + w[0] (1 - t))               # then averaged over the k labels

``alpha`` (the paper's class balance, 0.25 there) is optional; without it both terms
have weight one.

Class weights scale each example's loss by the weight of its *true* class (for soft
targets: the target-weighted mix of class weights, taken before smoothing). This is
the same reweighting as ``fit(class_weight=...)`` but it lives in the loss, so it also
works with one-hot targets and is saved with the model.

Both classes are registered as serializable: a model compiled with them saves with
``model.save`` and reloads with ``keras.models.load_model``. :func:`make_loss` turns
the train stage's ``loss`` option into what ``model.compile`` takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before the logarithm.
EPSILON = 1e-7

#: Losses only this module implements (Keras has no sparse focal loss).
DLPIPE_ONLY = ("sparse_categorical_focal_crossentropy",)


# ------------------------------------------------------------------------ helpers


def smooth(targets: Any, smoothing: float, classes: int) -> Any:
    """Label smoothing: move ``smoothing`` of the probability mass to a uniform
    distribution over ``classes`` (2 for a binary label)."""
    if not smoothing:
        return targets
    return targets * (1.0 - smoothing) + smoothing / classes


def sparse_to_one_hot(labels: Any, probs: Any) -> Any:
    """Integer class ids (``(n,)``, ``(n, 1)``, or ``(n, T)`` for sequences) as one-hot
    rows matching ``probs``' shape ``(..., C)``."""
    if len(labels.shape) == len(probs.shape):  # (n, 1) labels for (n, C) outputs
        labels = ops.squeeze(labels, axis=-1)
    return ops.one_hot(ops.cast(labels, "int32"), probs.shape[-1], dtype=probs.dtype)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """``n / (C * n_c)`` per class, the 'balanced' heuristic (as in scikit-learn): every
    class then contributes the same total weight. Absent classes get weight 1."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    n = float(len(labels))
    return [n / (num_classes * c) if c > 0 else 1.0 for c in counts]


def class_weight_list(
    weights: Sequence[float] | Mapping[Any, float],
    num_classes: int,
    class_names: Sequence[str] = (),
) -> list[float]:
    """A weight per class from a list, or from a mapping keyed by class index or class
    name (unlisted classes weigh 1)."""
    if not isinstance(weights, Mapping):
        out = [float(w) for w in weights]
        if len(out) != num_classes:
            raise ValueError(f"class weights list has {len(out)} entries for {num_classes} classes")
        return out
    out = [1.0] * num_classes
    names = list(class_names)
    for key, value in weights.items():
        if isinstance(key, str) and key in names:
            index = names.index(key)
        elif isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            index = int(key)
        else:
            raise ValueError(f"class weight key {key!r} is neither a class index nor one of {names}")
        if not 0 <= index < num_classes:
            raise ValueError(f"class weight key {key!r}: class index out of range 0..{num_classes - 1}")
        out[index] = float(value)
    return out


# ------------------------------------------------------------------------- losses


@keras.saving.register_keras_serializable(package="dlpipe")
class CategoricalLoss(keras.losses.Loss):
    """Cross-entropy or focal loss over ``C`` classes, sparse or one-hot targets.

    Args:
        sparse: targets are class ids (else one-hot or soft rows).
        gamma: focal exponent; 0 is plain cross-entropy.
        alpha: optional scalar factor on every term (the focal paper's balance).
        label_smoothing: share of the target mass spread uniformly over the classes.
        class_weights: optional weight per class, applied by the true class.
        from_logits: the model outputs logits rather than softmax probabilities.
    """

    def __init__(
        self,
        sparse: bool = True,
        gamma: float = 0.0,
        alpha: float | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        from_logits: bool = False,
        name: str = "categorical_loss",
        reduction: str = "sum_over_batch_size",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.sparse = bool(sparse)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.from_logits = bool(from_logits)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        targets = sparse_to_one_hot(y_true, y_pred) if self.sparse else ops.cast(y_true, y_pred.dtype)
        smoothed = smooth(targets, self.label_smoothing, y_pred.shape[-1])
        if self.from_logits:
            log_probs = ops.log_softmax(y_pred, axis=-1)
            probs = ops.exp(log_probs)
        else:
            probs = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
            log_probs = ops.log(probs)
        terms = -smoothed * log_probs
        if self.gamma:
            terms = terms * ops.power(1.0 - probs, self.gamma)
        if self.alpha is not None:
            terms = terms * self.alpha
        loss = ops.sum(terms, axis=-1)
        if self.class_weights is not None:
            weights = ops.convert_to_tensor(self.class_weights, dtype=y_pred.dtype)
            loss = loss * ops.sum(targets * weights, axis=-1)
        return loss

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "sparse": self.sparse,
            "gamma": self.gamma,
            "alpha": self.alpha,
            "label_smoothing": self.label_smoothing,
            "class_weights": self.class_weights,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(package="dlpipe")
class BinaryLoss(keras.losses.Loss):
    """Binary cross-entropy or focal loss for sigmoid outputs (one or more labels).

    Args:
        gamma: focal exponent; 0 is plain binary cross-entropy.
        alpha: optional weight of the positive term (``1 - alpha`` for the negative).
        label_smoothing: squeeze the 0/1 targets towards 0.5.
        class_weights: optional ``[weight of 0, weight of 1]``.
        from_logits: the model outputs logits rather than probabilities.
    """

    def __init__(
        self,
        gamma: float = 0.0,
        alpha: float | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        from_logits: bool = False,
        name: str = "binary_loss",
        reduction: str = "sum_over_batch_size",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and len(self.class_weights) != 2:
            raise ValueError("binary class_weights need two entries: [weight of 0, weight of 1]")
        self.from_logits = bool(from_logits)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        targets = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
        smoothed = smooth(targets, self.label_smoothing, 2)
        if self.from_logits:
            log_p, log_not_p = ops.log_sigmoid(y_pred), ops.log_sigmoid(-y_pred)
            probs = ops.sigmoid(y_pred)
        else:
            probs = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
            log_p, log_not_p = ops.log(probs), ops.log(1.0 - probs)
        positive = -smoothed * log_p
        negative = -(1.0 - smoothed) * log_not_p
        if self.gamma:
            positive = positive * ops.power(1.0 - probs, self.gamma)
            negative = negative * ops.power(probs, self.gamma)
        if self.alpha is not None:
            positive, negative = positive * self.alpha, negative * (1.0 - self.alpha)
        loss = positive + negative
        if self.class_weights is not None:
            w0, w1 = self.class_weights
            loss = loss * (w1 * targets + w0 * (1.0 - targets))
        return ops.mean(loss, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "alpha": self.alpha,
            "label_smoothing": self.label_smoothing,
            "class_weights": self.class_weights,
            "from_logits": self.from_logits,
        }


# ------------------------------------------------------------ from the train spec


def make_loss(
    spec: Any,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] = (),
    train_labels: np.ndarray | None = None,
) -> Any:
    """What ``model.compile(loss=...)`` gets for the train stage's ``loss`` option.

    ``spec`` is a plain Keras loss name (passed through unchanged) or the structured
    :class:`dlpipe.stages.train.LossParams`. A structured loss with no options set
    and a Keras name is passed as that name too, so its behaviour is exactly Keras'.
    ``num_classes`` (the model's output width) resolves class-weight mappings;
    ``train_labels`` resolves ``class_weights: balanced``.
    """
    if spec is None or isinstance(spec, str):
        return spec
    name = spec.name
    options = spec.options()
    if name == "huber":
        return keras.losses.Huber(delta=spec.delta if spec.delta is not None else 1.0)
    if not options and name not in DLPIPE_ONLY:
        return name
    if name in ("mse", "mae", "mean_squared_error", "mean_absolute_error") or not spec.is_classification():
        raise ValueError(f"loss {name!r} takes no options (got {sorted(options)})")

    binary = name.startswith("binary")
    classes = 2 if binary else num_classes
    weights: list[float] | None = None
    if spec.class_weights is not None:
        if classes is None:
            raise ValueError("class_weights need the number of classes (the model's output width)")
        if spec.class_weights == "balanced":
            if train_labels is None:
                raise ValueError("class_weights: balanced needs training labels")
            weights = balanced_class_weights(train_labels, classes)
        else:
            weights = class_weight_list(spec.class_weights, classes, class_names)
    focal = "focal" in name
    common = {
        "gamma": (spec.gamma if spec.gamma is not None else 2.0) if focal else 0.0,
        "alpha": spec.alpha if focal else None,
        "label_smoothing": spec.label_smoothing or 0.0,
        "class_weights": weights,
        "from_logits": spec.from_logits,
        "name": name,
    }
    if binary:
        return BinaryLoss(**common)
    return CategoricalLoss(sparse=name.startswith("sparse"), **common)
