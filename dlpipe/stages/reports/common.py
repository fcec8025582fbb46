"""What the evaluate stages share: the checks every report starts with, the model's
compiled metrics and predictions on a split (both over ``data.dataset``, so streamed
data counts in full), the printed summary, and metric-safe class names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError


def evaluation_inputs(
    ctx: Any,
    split: str,
    what: str = "evaluation",
    targets: str | None = None,
    *,
    bundle: type | None = None,
    before: str = "a data stage and a trained model",
    methods: Sequence[str] = (),
    use: str | None = None,
) -> tuple[Any, Any, str]:
    """``(model, data, stage id)`` for an evaluate stage, or a clear error.

    Checks that a data stage and a model came before (``bundle``: the data must be
    that kind of bundle; ``before`` says what is needed, in the message), that the
    model has ``methods`` (``use`` names the architectures that do), that ``split``
    has examples, and, when ``targets`` names them ("labels", "masks", ...), that it
    has targets.
    """
    stage = ctx.stage.id if ctx.stage is not None else what
    model, data = ctx.model, ctx.data
    if model is None or data is None or (bundle is not None and not isinstance(data, bundle)):
        raise DlpipeError(f"stage {stage!r}: {what} needs {before} before it")
    missing = [m for m in methods if not callable(getattr(model, m, None))]
    if missing:
        hint = f" (use {use})" if use else ""
        raise DlpipeError(
            f"stage {stage!r}: the model ({type(model).__name__}) has no "
            f"{'/'.join(missing)} method{hint}"
        )
    if data.size(split) == 0:
        raise DlpipeError(
            f"stage {stage!r}: the {split!r} split is empty; set a non-zero "
            f"{'test' if split == 'test' else 'val'}_fraction in the data stage or evaluate "
            "another split (params.split)"
        )
    if targets is not None and data.y.get(split) is None:
        raise DlpipeError(f"stage {stage!r}: the {split!r} split has no {targets} to compare with")
    return model, data, stage


def compiled_metrics(model: Any, data: Any, split: str, batch_size: int) -> dict[str, float]:
    """The model's compiled loss and metrics on ``split``, as ``{split}_{name}``."""
    results = model.evaluate(data.dataset(split, batch_size), return_dict=True, verbose=0)
    return {f"{split}_{k}": float(v) for k, v in results.items() if np.ndim(v) == 0}


def split_predictions(model: Any, data: Any, split: str, batch_size: int) -> tuple[np.ndarray, Any]:
    """The labels of the whole of ``split`` and the model's raw outputs on it (a list
    for several outputs), in one pass over ``data.dataset``, so that streamed data is
    read in full, batch by batch."""
    labels: list[np.ndarray] = []
    outputs: list[Any] = []
    for batch in data.dataset(split, batch_size):
        labels.append(np.asarray(batch[1]))
        # predict, not predict_on_batch: under a strategy with several replicas
        # predict_on_batch hands every replica the whole batch.
        outputs.append(model.predict(batch[0], batch_size=len(batch[1]), verbose=0))
    first = outputs[0]
    if isinstance(first, (list, tuple)):
        joined: Any = [np.concatenate([np.asarray(o[k]) for o in outputs])
                       for k in range(len(first))]
    else:
        joined = np.concatenate([np.asarray(o) for o in outputs])
    return np.concatenate(labels), joined


def print_metrics(title: str, metrics: Mapping[str, float]) -> None:
    """A report's metrics under its title, one aligned line each."""
    print(f"{title}:")
    width = max((len(k) for k in metrics), default=0)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}")


def metric_suffix(name: str) -> str:
    """A class name as part of a metric name (letters, digits, ``_ . -``):
    ``"traffic light"`` -> ``traffic_light``; ``"class"`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"
