"""One-stage object detection: the ``yolo`` architecture and the ``detection_report``
evaluate stage.

Code: :mod:`dlpipe.models.yolo.model` (the YOLO-v1-style detector and its loss),
:mod:`dlpipe.models.yolo.boxes` (IoU, NMS, decoding, mAP in NumPy) and
:mod:`dlpipe.stages.reports.detection`. Both expect the ``shapes_detection`` data
layout: padded ``(n, max_objects, 5)`` rows ``[class, x0, y0, x1, y1]``. Nothing here
imports Keras.
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


class DetectionReportParams(Params):
    """mAP@0.5, mAP@0.5:0.95 and per-class AP50 on a split, plus drawn detections."""

    split: Literal["test", "val", "train"] = "test"
    batch_size: int = Field(128, ge=1)
    score_threshold: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Drop boxes scoring below this before NMS (low keeps recall for mAP).",
    )
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0, description="NMS IoU threshold.")
    max_detections: int = Field(20, ge=1, description="Most detections kept per image.")
    draw_threshold: float = Field(
        0.3, ge=0.0, le=1.0, description="Only detections scoring at least this are drawn."
    )
    images: int = Field(16, ge=0, le=64, description="Test images drawn with their boxes.")
    plots: bool = Field(True, description="Detections grid, PR curves, learning curves.")


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


@hookimpl
def register_stages(register):
    register("evaluate", "detection_report", "dlpipe.stages.reports.detection:detection_report",
             DetectionReportParams,
             "Detection mAP@0.5 and @0.5:0.95, per-class AP, drawn boxes and PR curves.")
