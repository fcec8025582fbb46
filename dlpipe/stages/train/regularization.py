"""``regularization`` for ``keras_fit``: L1/L2 penalties on the kernels of the layers
a spec's globs name."""

from __future__ import annotations

import fnmatch
from typing import Any

import keras

from dlpipe.errors import DlpipeError

#: Weight attributes a penalty applies to, and the layer option that records it in
#: the layer's config (so a saved model reloads with the same penalty).
_PENALIZED = (
    ("kernel", ("kernel_regularizer", "depthwise_regularizer")),
    ("depthwise_kernel", ("depthwise_regularizer",)),
    ("pointwise_kernel", ("pointwise_regularizer",)),
    ("embeddings", ("embeddings_regularizer",)),
)


def all_layers(model: Any) -> list[Any]:
    """Every layer inside ``model``, nested models' layers included, in order."""
    found: list[Any] = []
    for layer in getattr(model, "layers", None) or []:
        found.append(layer)
        found.extend(all_layers(layer))
    return found


def _kernels(layer: Any) -> list[Any]:
    out = []
    for attr, _ in _PENALIZED:
        try:
            var = getattr(layer, attr, None)
        except Exception:  # noqa: BLE001 - a property of an unbuilt or quantized layer
            var = None
        if isinstance(var, keras.Variable) and var.trainable:
            out.append(var)
    return out


def apply_regularization(model: Any, rules: list[Any]) -> dict[str, Any]:
    """Attach ``L1L2`` penalties to the kernels of the layers each rule's glob matches.

    A glob matches a layer's name or its class name, ignoring case (``conv*`` finds
    ``Conv2D`` layers and layers named ``conv3``); the last rule matching a layer wins.
    The model is already built, so a layer's ``kernel_regularizer`` option alone would
    do nothing: Keras collects penalties from ``variable.regularizer`` of the trainable
    weights (``Layer.losses``), so the regularizer is set on the kernel variable. The
    layer option is set too, so the saved model's config carries the penalty. Keras'
    built-in ``train_step`` adds ``model.losses`` to the loss; models with their own
    ``train_step`` must add them themselves. Returns ``{layer name: regularizer}``.
    """
    chosen: dict[int, tuple[Any, Any]] = {}
    candidates = [layer for layer in all_layers(model) if _kernels(layer)]
    for rule in rules:
        pattern = rule.layers.lower()
        matched = [
            layer for layer in candidates
            if fnmatch.fnmatchcase(layer.name.lower(), pattern)
            or fnmatch.fnmatchcase(type(layer).__name__.lower(), pattern)
        ]
        if not matched:
            names = ", ".join(f"{la.name} ({type(la).__name__})" for la in candidates) or "none"
            raise DlpipeError(
                f"regularization: layers {rule.layers!r} matches no layer with weights; "
                f"layers with kernels: {names}"
            )
        regularizer = keras.regularizers.L1L2(l1=rule.l1, l2=rule.l2) if (rule.l1 or rule.l2) else None
        for layer in matched:
            chosen[id(layer)] = (layer, regularizer)
    applied: dict[str, Any] = {}
    for layer, regularizer in chosen.values():
        for var in _kernels(layer):
            var.regularizer = regularizer
        for _, options in _PENALIZED:
            for option in options:
                if hasattr(layer, option):
                    setattr(layer, option, regularizer)
        if regularizer is not None:
            applied[layer.name] = regularizer
    return applied


def regularize(params: Any, model: Any, own_loss: bool) -> None:
    """Apply the spec's ``regularization`` rules, if any, and say where they went."""
    if not params.regularization:
        return
    applied = apply_regularization(model, params.regularization)
    if own_loss:
        print("train: note: this model computes its own loss; regularization counts only "
              "if its train_step adds model.losses")
    print(f"train: regularization on {len(applied)} layer(s): "
          + ", ".join(f"{name} (l1={r.l1:g}, l2={r.l2:g})" for name, r in applied.items()))
