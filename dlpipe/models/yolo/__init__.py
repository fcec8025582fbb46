"""``yolo``: one-stage YOLO-v1-style detection.

The Keras code is in :mod:`dlpipe.models.yolo.model`; box arithmetic (IoU, NMS, mAP)
in NumPy is in :mod:`dlpipe.models.yolo.boxes`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class YOLOParams(Params):
    """YOLO v1 at toy scale: conv backbone, S x S grid, B boxes and C classes per cell.

    The loss terms ``coord`` (λ_coord, default 5), ``obj`` (1), ``noobj`` (λ_noobj,
    default 0.5) and ``class`` (1) are set with ``train.loss_weights.<term>``.
    """

    grid: int = Field(
        8, ge=1, le=32,
        description="S: cells per side. conv head: the image side must be S times a "
        "power of two (64 with 8 or 4, 48 with 6).",
    )
    boxes: int = Field(2, ge=1, le=8, description="B: boxes predicted per cell.")
    filters: list[int] = Field(
        default_factory=lambda: [16, 32, 64, 128],
        description="Backbone: filters per block of 3x3 convolutions; the first "
        "log2(size / grid) blocks end in 2x2 max pooling, later ones stay at grid size.",
    )
    convs_per_block: int = Field(1, ge=1, le=4, description="3x3 convolutions per block.")
    head: Literal["conv", "dense"] = Field(
        "conv",
        description="conv: a 3x3 conv and a 1x1 predictor per cell; dense: the paper's "
        "fully connected head over the whole image (every block pools).",
    )
    head_filters: int = Field(
        128, ge=1, description="conv head: filters of its 3x3 conv; dense head: hidden units."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the predictor.")
    batch_norm: bool = Field(True, description="Batch normalization after each convolution.")
    rescore: bool = Field(
        True, description="obj target is the predicted box's IoU with the truth (else 1)."
    )
    class_loss: Literal["sse", "crossentropy"] = Field(
        "sse", description="Class term: squared error (the paper) or cross-entropy."
    )

    @model_validator(mode="after")
    def _filters(self) -> YOLOParams:
        if not self.filters or any(f < 1 for f in self.filters):
            raise ValueError("filters must list at least one positive filter count")
        return self


@hookimpl
def register_models(register):
    register(
        "yolo",
        build="dlpipe.models.yolo.model:build",
        params=YOLOParams,
        description="YOLO-v1-style one-stage grid detector (loss terms coord/obj/noobj/class).",
        task="detection",
        loss_weights=("coord", "obj", "noobj", "class"),
        example_params={"grid": 4, "boxes": 2, "filters": [4, 8], "head_filters": 8},
        example_data="dlpipe.models.yolo.model:example_data",
    )
