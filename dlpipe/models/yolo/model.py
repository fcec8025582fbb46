"""A YOLO-v1-style one-stage detector for the ``yolo`` architecture.

After Redmon et al., "You Only Look Once: Unified, Real-Time Object Detection"
(2016), at toy scale. A convolutional backbone shrinks the image to an ``S x S``
grid; every cell predicts ``B`` boxes and one set of class probabilities:

* per box ``[x, y, sqrt(w), sqrt(h), confidence]``: ``x, y`` the box centre relative
  to the cell (0..1), ``w, h`` relative to the image, squashed by sigmoids (the paper
  leaves them linear; sigmoids keep early training stable);
* per cell ``C`` class probabilities (softmax), shared by its ``B`` boxes.

So ``model(x)`` returns ``(batch, S, S, 5 * B + C)``. Predicting square roots makes
an error on a small box cost more than the same error on a large one.

**Targets** are the data's padded rows ``[class, x0, y0, x1, y1]`` (class -1 pads).
:func:`encode_targets` assigns each true box to the cell that holds its centre (one
object per cell: the first listed wins), with keras.ops and without Python loops over
boxes. In that cell the predictor whose current box overlaps the truth most (highest
IoU among the ``B``) is *responsible* for it.

**The loss** (:func:`yolo_loss_terms`), summed over cells and averaged over images,
has four named terms weighted by ``YOLODetector.loss_weights``:

* ``coord`` (λ_coord, default 5): squared error of ``x, y, sqrt w, sqrt h`` of the
  responsible predictors;
* ``obj`` (default 1): ``(confidence - target)^2`` of the responsible predictors; the
  target is the IoU of the predicted with the true box (``rescore``, as in the paper)
  or 1;
* ``noobj`` (λ_noobj, default 0.5): ``confidence^2`` of all other predictors, which
  keeps the many empty cells from swamping the gradient;
* ``class`` (default 1): squared error (the paper) or cross-entropy of the class
  probabilities of cells that hold an object.

A spec sets them with ``train.loss_weights.coord`` etc., the tune stage searches them
by that path, and training reports each term (unweighted) as ``<term>_loss``.
:meth:`YOLODetector.detect` decodes outputs into boxes with NumPy
(:func:`dlpipe.models.yolo.boxes.decode_grid`: confidence x class probability as the score,
then per-class non-maximum suppression).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.errors import DlpipeError
from dlpipe.models.common import make_loss_weights, replica_scaled
from dlpipe.models.yolo.boxes import Detections, decode_grid

LOSS_TERMS = ("coord", "obj", "noobj", "class")
#: The paper's λ_coord = 5 and λ_noobj = 0.5; the other terms start at 1.
DEFAULT_WEIGHTS = {"coord": 5.0, "noobj": 0.5}


# --------------------------------------------------------------------------------------
# Targets and loss, with keras.ops
# --------------------------------------------------------------------------------------


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


def _batch_mean(values: Any, sample_weight: Any) -> Any:
    if sample_weight is None:
        return ops.mean(values)
    sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), "float32")
    return ops.sum(values * sample_weight) / ops.maximum(ops.sum(sample_weight), 1e-12)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class YOLODetector(keras.Model):
    """A YOLO-v1 grid detector that computes its own loss from padded box targets.

    :param network: a functional model ``image -> (S, S, 5B + C)`` raw outputs.
    :param boxes: ``B``, predictors per cell.
    :param num_classes: ``C``.
    :param rescore: the ``obj`` target is the predicted box's IoU (else 1).
    :param class_loss: ``sse`` (the paper) or ``crossentropy``.

    ``model(x)`` returns ``(batch, S, S, 5B + C)``: sigmoid box values and confidences,
    softmax class probabilities. Compile with an optimizer only: the loss is built in.
    """

    def __init__(
        self,
        network: keras.Model,
        boxes: int = 2,
        num_classes: int = 3,
        rescore: bool = True,
        class_loss: str = "sse",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if class_loss not in ("sse", "crossentropy"):
            raise ValueError(f"class_loss must be 'sse' or 'crossentropy', not {class_loss!r}")
        self.network = network
        self.boxes = int(boxes)
        self.num_classes = int(num_classes)
        self.rescore = bool(rescore)
        self.class_loss = class_loss
        out_shape = network.outputs[0].shape
        self.grid = int(out_shape[1])
        if int(out_shape[-1]) != 5 * self.boxes + self.num_classes:
            raise ValueError(
                f"network outputs {out_shape[-1]} values per cell; {self.boxes} boxes and "
                f"{self.num_classes} classes need {5 * self.boxes + self.num_classes}"
            )
        self.loss_weights = make_loss_weights(LOSS_TERMS, DEFAULT_WEIGHTS)
        self.term_trackers = {name: keras.metrics.Mean(name=f"{name}_loss") for name in LOSS_TERMS}

    def build(self, input_shape: Any = None) -> None:
        self.built = True  # the functional network is built already

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        raw = ops.cast(self.network(inputs, training=training), "float32")
        box = ops.sigmoid(raw[..., : 5 * self.boxes])
        probs = ops.softmax(raw[..., 5 * self.boxes :], axis=-1)
        return ops.concatenate([box, probs], axis=-1)

    def loss_terms(self, y: Any, y_pred: Any, sample_weight: Any = None) -> dict[str, Any]:
        """Batch means of the unweighted terms ``coord``, ``obj``, ``noobj``, ``class``."""
        terms = yolo_loss_terms(
            y, y_pred, self.grid, self.boxes, self.num_classes, self.rescore, self.class_loss
        )
        return {name: _batch_mean(value, sample_weight) for name, value in terms.items()}

    def weighted_loss(self, terms: dict[str, Any]) -> Any:
        return sum(self.loss_weights[name] * terms[name] for name in LOSS_TERMS)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        terms = self.loss_terms(y, y_pred, sample_weight)
        batch = ops.shape(y_pred)[0]
        for name, tracker in self.term_trackers.items():
            tracker.update_state(terms[name], sample_weight=batch)
        total = self.weighted_loss(terms)
        if self.losses:  # regularizers
            total = total + ops.cast(ops.sum(self.losses), total.dtype)
        # Keras's train_step expects a loss already scaled for the replica count.
        return replica_scaled(total)

    def detect(
        self,
        x: np.ndarray,
        score_threshold: float = 0.05,
        iou_threshold: float = 0.5,
        max_detections: int = 20,
        batch_size: int = 128,
    ) -> list[Detections]:
        """Boxes, scores and classes per image, after per-class non-maximum suppression."""
        out = self.predict(np.asarray(x, dtype="float32"), batch_size=batch_size, verbose=0)
        return decode_grid(out, self.boxes, score_threshold, iou_threshold, max_detections)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "boxes": self.boxes,
            "num_classes": self.num_classes,
            "rescore": self.rescore,
            "class_loss": self.class_loss,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> YOLODetector:
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        return cls(network, **config)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


def conv_block(h: Any, filters: int, name: str, batch_norm: bool) -> Any:
    """3x3 convolution, optional batch norm, leaky ReLU (0.1, as in the paper)."""
    h = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv")(h)
    if batch_norm:
        h = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(h)
    return layers.LeakyReLU(0.1, name=f"{name}_act")(h)


def pools_needed(size: int, grid: int) -> int:
    """How many 2x2 poolings take an image side of ``size`` down to ``grid`` cells."""
    ratio = size / grid
    pools = round(math.log2(ratio)) if ratio >= 1 else -1
    if size % grid or pools < 0 or 2**pools != size // grid:
        raise DlpipeError(
            f"yolo: the conv head needs the image side ({size}) to be the grid ({grid}) "
            "times a power of two, e.g. 64 with grid 8 or 4, 48 with grid 6 or 3; change "
            "model.grid or the data's size, or use head: dense"
        )
    return pools


def build_network(params: Any, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """``image -> (S, S, 5B + C)`` raw outputs.

    Backbone: one block per ``filters`` entry (``convs_per_block`` 3x3 convolutions),
    each followed by 2x2 max pooling until the grid size is reached (``conv`` head) or
    while the map is at least 2x2 (``dense`` head). ``conv`` head: a 3x3 convolution
    of ``head_filters`` and a 1x1 predictor per cell. ``dense`` head (the paper's):
    flatten, a hidden Dense of ``head_filters`` units, then ``S * S * (5B + C)`` values.
    """
    grid, boxes = params.grid, params.boxes
    per_cell = 5 * boxes + num_classes
    side = int(input_shape[0])
    if params.head == "conv":
        pools = pools_needed(side, grid)
        if pools > len(params.filters):
            raise DlpipeError(
                f"yolo: going from {side} pixels to a {grid}x{grid} grid takes {pools} "
                f"poolings, but filters lists only {len(params.filters)} blocks; add entries "
                "to model.filters or use a larger grid"
            )
    else:
        pools = len(params.filters)
    inputs = keras.Input(shape=input_shape, name="image")
    h = inputs
    spatial = side
    for i, filters in enumerate(params.filters):
        for j in range(params.convs_per_block):
            h = conv_block(h, filters, f"block{i + 1}_{j + 1}", params.batch_norm)
        if i < pools and spatial >= 2:
            h = layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(h)
            spatial //= 2
    if params.head == "conv":
        h = conv_block(h, params.head_filters, "head", params.batch_norm)
        if params.dropout > 0:
            h = layers.Dropout(params.dropout, name="head_dropout")(h)
        outputs = layers.Conv2D(per_cell, 1, dtype="float32", name="predictor")(h)
    else:
        h = layers.Flatten(name="flatten")(h)
        h = layers.Dense(params.head_filters, name="head_dense")(h)
        h = layers.LeakyReLU(0.1, name="head_act")(h)
        if params.dropout > 0:
            h = layers.Dropout(params.dropout, name="head_dropout")(h)
        h = layers.Dense(grid * grid * per_cell, dtype="float32", name="predictor")(h)
        outputs = layers.Reshape((grid, grid, per_cell), name="grid")(h)
    return keras.Model(inputs, outputs, name="yolo_network")


def build(params: Any, data: Any) -> YOLODetector:
    """The registered builder: a built, uncompiled :class:`YOLODetector` for ``data``."""
    input_shape = tuple(data.input_shape)
    if len(input_shape) != 3 or input_shape[0] != input_shape[1]:
        raise DlpipeError(
            f"yolo needs square images (size, size, channels), got input shape {input_shape}"
        )
    y = data.y.get("train")
    if y is None or np.ndim(y) != 3 or np.shape(y)[-1] != 5:
        shape = None if y is None else np.shape(y)
        raise DlpipeError(
            "yolo needs padded box targets (n, max_objects, 5) of [class, x0, y0, x1, y1] "
            f"rows, as the shapes_detection data stage makes; got targets of shape {shape}"
        )
    num_classes = int(data.num_classes or 0)
    if num_classes < 1:
        raise DlpipeError("yolo: the data declares no classes (num_classes)")
    network = build_network(params, input_shape, num_classes)
    model = YOLODetector(
        network,
        boxes=params.boxes,
        num_classes=num_classes,
        rescore=params.rescore,
        class_loss=params.class_loss,
        name="yolo",
    )
    model(np.zeros((1, *input_shape), dtype="float32"))  # variables exist before fit
    return model


def example_data() -> Any:
    """A tiny detection bundle (16x16 shapes) for the conformance test."""
    from dlpipe.data import DataBundle
    from dlpipe.datasets.shapes import SHAPES, generate_scenes

    scenes = generate_scenes(24, size=16, objects=(1, 2), min_frac=0.3, max_frac=0.5, seed=0)
    x, y = scenes.images, scenes.boxes(2)
    parts = {"train": slice(0, 16), "val": slice(16, 20), "test": slice(20, 24)}
    return DataBundle(
        x={s: x[p] for s, p in parts.items()},
        y={s: y[p] for s, p in parts.items()},
        task="detection",
        num_classes=len(SHAPES),
        class_names=list(SHAPES),
        name="tiny_shapes_detection",
    )
