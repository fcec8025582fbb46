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

The targets and the four loss terms ``coord``, ``obj``, ``noobj`` and ``class`` are in
:mod:`dlpipe.models.yolo.loss`; :class:`YOLODetector` weights the terms by its
``loss_weights``. A spec sets them with ``train.loss_weights.coord`` etc., the tune
stage searches them by that path, and training reports each term (unweighted) as
``<term>_loss``. :meth:`YOLODetector.detect` decodes outputs into boxes with NumPy
(:func:`dlpipe.models.yolo.boxes.decode_grid`: confidence x class probability as the score,
then per-class non-maximum suppression).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.common import batch_mean, make_loss_weights, replica_scaled
from dlpipe.models.yolo import YOLOParams
from dlpipe.models.yolo.boxes import Detections, decode_grid
from dlpipe.models.yolo.loss import DEFAULT_WEIGHTS, LOSS_TERMS, yolo_loss_terms

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
            raise DlpipeError(f"class_loss must be 'sse' or 'crossentropy', not {class_loss!r}")
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
        return {name: batch_mean(value, sample_weight) for name, value in terms.items()}

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


def build_network(
    params: YOLOParams, input_shape: tuple[int, ...], num_classes: int
) -> keras.Model:
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


def build(params: YOLOParams, data: DataBundle) -> YOLODetector:
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


def example_data() -> DataBundle:
    """A tiny detection bundle (16x16 shapes) for the conformance test."""
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
