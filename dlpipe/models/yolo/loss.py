"""The targets and loss of the ``yolo`` detector (YOLO v1), with keras.ops.

**Targets** are the data's padded rows ``[class, x0, y0, x1, y1]`` (class -1 pads).
:func:`encode_targets` assigns each true box to the cell that holds its centre (one
object per cell: the first listed wins), without Python loops over boxes. In that cell
the predictor whose current box overlaps the truth most (highest IoU among the ``B``)
is *responsible* for it.

**The loss** (:func:`yolo_loss_terms`), summed over cells and averaged over images,
has four named terms (:data:`LOSS_TERMS`):

* ``coord`` (λ_coord, default 5): squared error of ``x, y, sqrt w, sqrt h`` of the
  responsible predictors;
* ``obj`` (default 1): ``(confidence - target)^2`` of the responsible predictors; the
  target is the IoU of the predicted with the true box (``rescore``, as in the paper)
  or 1;
* ``noobj`` (λ_noobj, default 0.5): ``confidence^2`` of all other predictors, which
  keeps the many empty cells from swamping the gradient;
* ``class`` (default 1): squared error (the paper) or cross-entropy of the class
  probabilities of cells that hold an object.
"""

from __future__ import annotations

from typing import Any

from keras import ops

LOSS_TERMS = ("coord", "obj", "noobj", "class")
#: The paper's λ_coord = 5 and λ_noobj = 0.5; the other terms start at 1.
DEFAULT_WEIGHTS = {"coord": 5.0, "noobj": 0.5}


def corners(cx: Any, cy: Any, w: Any, h: Any) -> Any:
    """Centre/size -> ``[..., 4]`` corner boxes."""
    return ops.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_iou(a: Any, b: Any) -> Any:
    """Element-wise IoU of broadcastable ``[..., 4]`` corner boxes."""
    wh = ops.maximum(ops.minimum(a[..., 2:], b[..., 2:]) - ops.maximum(a[..., :2], b[..., :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ops.maximum(a[..., 2] - a[..., 0], 0.0) * ops.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = ops.maximum(b[..., 2] - b[..., 0], 0.0) * ops.maximum(b[..., 3] - b[..., 1], 0.0)
    return inter / ops.maximum(area_a + area_b - inter, 1e-9)


def encode_targets(y: Any, grid: int, num_classes: int) -> dict[str, Any]:
    """Grid targets for padded boxes ``y`` ``(batch, max_objects, 5)``.

    :returns: ``object`` ``(batch, S, S)`` 1 where a cell holds a box centre;
        ``xy`` ``(batch, S, S, 2)`` the centre relative to the cell; ``sqrt_wh``
        ``(batch, S, S, 2)``; ``box`` ``(batch, S, S, 4)`` the corner box; ``class``
        ``(batch, S, S, C)`` one-hot. Cells without an object are zero.
    """
    y = ops.cast(y, "float32")
    max_objects = ops.shape(y)[1]
    label, x0, y0, x1, y1 = (y[..., k] for k in range(5))
    valid = ops.cast(label >= 0, "float32")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    col = ops.clip(ops.floor(cx * grid), 0, grid - 1)
    row = ops.clip(ops.floor(cy * grid), 0, grid - 1)
    cell = ops.cast(row * grid + col, "int32")
    in_cell = ops.one_hot(cell, grid * grid) * valid[..., None]  # (batch, M, S*S)
    # One object per cell: where two centres share a cell the first listed one wins.
    priority = ops.cast(max_objects - ops.arange(max_objects), "float32")
    winner = ops.argmax(in_cell * priority[None, :, None], axis=1)  # (batch, S*S)
    has_object = ops.max(in_cell, axis=1)  # (batch, S*S)
    select = ops.one_hot(winner, max_objects) * has_object[..., None]  # (batch, S*S, M)
    rows = ops.einsum("bcm,bmk->bck", select, y)  # each cell's box row (zeros if empty)
    shape = (-1, grid, grid)
    cell_col = ops.cast(ops.arange(grid * grid) % grid, "float32")
    cell_row = ops.cast(ops.arange(grid * grid) // grid, "float32")
    bx0, by0, bx1, by1 = (rows[..., k] for k in range(1, 5))
    w = ops.maximum(bx1 - bx0, 0.0)
    h = ops.maximum(by1 - by0, 0.0)
    x_rel = ((bx0 + bx1) / 2 * grid - cell_col) * has_object
    y_rel = ((by0 + by1) / 2 * grid - cell_row) * has_object
    label = ops.cast(ops.maximum(rows[..., 0], 0.0), "int32")
    one_hot = ops.one_hot(label, num_classes) * has_object[..., None]
    return {
        "object": ops.reshape(has_object, shape),
        "xy": ops.reshape(ops.stack([x_rel, y_rel], axis=-1), (*shape, 2)),
        "sqrt_wh": ops.reshape(ops.stack([ops.sqrt(w), ops.sqrt(h)], axis=-1), (*shape, 2)),
        "box": ops.reshape(rows[..., 1:5], (*shape, 4)),
        "class": ops.reshape(one_hot, (*shape, num_classes)),
    }


def split_output(y_pred: Any, boxes: int) -> tuple[Any, Any]:
    """``(batch, S, S, 5B + C)`` -> boxes ``(batch, S, S, B, 5)`` and class probabilities."""
    y_pred = ops.cast(y_pred, "float32")
    grid_rows, grid_cols = ops.shape(y_pred)[1], ops.shape(y_pred)[2]
    box = ops.reshape(y_pred[..., : 5 * boxes], (-1, grid_rows, grid_cols, boxes, 5))
    return box, y_pred[..., 5 * boxes :]


def predicted_corners(box: Any, grid: int) -> Any:
    """Corner boxes ``(batch, S, S, B, 4)`` of the predictors ``(batch, S, S, B, 5)``."""
    offsets = ops.cast(ops.arange(grid), "float32")
    col = offsets[None, None, :, None]
    row = offsets[None, :, None, None]
    cx = (col + box[..., 0]) / grid
    cy = (row + box[..., 1]) / grid
    return corners(cx, cy, ops.square(box[..., 2]), ops.square(box[..., 3]))


def responsible(box: Any, targets: dict[str, Any], grid: int) -> tuple[Any, Any]:
    """Which predictor answers for each cell's object, and its IoU with the truth.

    :returns: ``(batch, S, S, B)`` one-hot responsibility (zero in empty cells) and the
        IoUs, both without gradient.
    """
    overlap = box_iou(predicted_corners(box, grid), targets["box"][..., None, :])
    overlap = ops.stop_gradient(overlap)
    best = ops.one_hot(ops.argmax(overlap, axis=-1), int(box.shape[3]))
    return best * targets["object"][..., None], overlap


def yolo_loss_terms(
    y: Any,
    y_pred: Any,
    grid: int,
    boxes: int,
    num_classes: int,
    rescore: bool = True,
    class_loss: str = "sse",
) -> dict[str, Any]:
    """The four unweighted YOLO-v1 loss terms, each ``(batch,)`` (summed over cells)."""
    targets = encode_targets(y, grid, num_classes)
    box, probs = split_output(y_pred, boxes)
    resp, overlap = responsible(box, targets, grid)
    xy_err = ops.sum(ops.square(box[..., 0:2] - targets["xy"][..., None, :]), axis=-1)
    wh_err = ops.sum(ops.square(box[..., 2:4] - targets["sqrt_wh"][..., None, :]), axis=-1)
    confidence = box[..., 4]
    target_conf = overlap if rescore else ops.ones_like(confidence)
    obj_err = ops.square(confidence - target_conf)
    noobj_err = ops.square(confidence)
    if class_loss == "crossentropy":
        picked = ops.sum(targets["class"] * probs, axis=-1)
        class_err = -ops.log(ops.clip(picked, 1e-7, 1.0)) * targets["object"]
    else:
        class_err = ops.sum(ops.square(probs - targets["class"]), axis=-1) * targets["object"]
    axes = (1, 2, 3)
    return {
        "coord": ops.sum(resp * (xy_err + wh_err), axis=axes),
        "obj": ops.sum(resp * obj_err, axis=axes),
        "noobj": ops.sum((1.0 - resp) * noobj_err, axis=axes),
        "class": ops.sum(class_err, axis=(1, 2)),
    }
