"""What every array data stage ends with: :func:`finish` applies the options all of
them share (``limit``, the data checks of :mod:`dlpipe.datacheck`, ``image_size``, the
seeded train/val/test split, normalization fitted on the training split) and
:func:`publish` sets ``ctx.data``."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe import datacheck
from dlpipe.data import SPLITS, DataBundle, normalize, resize_images, split_indices
from dlpipe.errors import DlpipeError


def finish(
    ctx: Any,
    params: Any,
    name: str,
    x: np.ndarray,
    y: np.ndarray | None,
    task: str,
    class_names: list[str],
    *,
    resize: bool = True,
    weights: np.ndarray | None = None,
    source: str | None = None,
) -> DataBundle:
    """Limit, check, resize, split, normalize; set ``ctx.data`` and report the result.

    ``weights`` (optional per-example loss weights) are split with the examples.
    ``source`` (default: ``name``) starts the messages of the data checks: the file
    or folder the stage read.
    """
    source = source or name
    if params.limit is not None:
        x = x[: params.limit]
        y = None if y is None else y[: params.limit]
        weights = None if weights is None else weights[: params.limit]
    datacheck.check_arrays(source, x, y, task=task, num_classes=len(class_names) or None,
                           weights=weights)
    image = x.ndim == 4
    size = getattr(params, "image_size", None)
    if size is not None and resize:
        if not image:
            raise DlpipeError(
                f"{name}: image_size is set, but the data is not images (shape {x.shape[1:]})"
            )
        x = resize_images(x, size)

    seed = params.seed if params.seed is not None else ctx.seed
    stratify = params.stratify and task == "classification" and y is not None
    parts = split_indices(
        len(x), y, params.val_fraction, params.test_fraction, seed, stratify, source=source
    )
    xs = {s: x[idx] for s, idx in parts.items()}
    ys = {s: None if y is None else y[idx] for s, idx in parts.items()}
    ws = {s: None if weights is None else weights[idx] for s, idx in parts.items()}
    xs, value_range = normalize(xs, params.normalize, tuple(params.value_range), image=image,
                                given=given_statistics(params))

    num_classes = len(class_names) if task == "classification" else None
    bundle = DataBundle(
        x=xs,
        y=ys,
        task=task,
        num_classes=num_classes,
        class_names=class_names,
        value_range=value_range,
        name=name,
        weights=ws if weights is not None else {},
    )
    return publish(ctx, bundle)


def given_statistics(params: Any) -> dict[str, float]:
    """Normalization statistics the spec gives (the params of streaming-capable stages):
    ``input_range`` as ``low``/``high``, and ``mean``/``std``."""
    given: dict[str, float] = {}
    if getattr(params, "input_range", None) is not None:
        given["low"], given["high"] = (float(v) for v in params.input_range)
    if getattr(params, "mean", None) is not None and getattr(params, "std", None) is not None:
        given["mean"], given["std"] = float(params.mean), float(params.std)
    return given


def publish(ctx: Any, bundle: DataBundle) -> DataBundle:
    """Set ``ctx.data`` and print what the stage produced."""
    ctx.data = bundle
    ctx.extras["data"] = bundle.describe()
    sizes = "/".join(str(bundle.size(s)) for s in SPLITS)
    what = f"{bundle.num_classes} classes" if bundle.task == "classification" else bundle.task
    print(f"data: {bundle.name} {sizes} train/val/test, shape {bundle.input_shape}, {what}")
    return bundle
