"""``alexnet``: AlexNet scaled by a width multiplier.

The Keras code is in :mod:`dlpipe.models.alexnet.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.fields import Stem
from dlpipe.params import Params


class AlexNetParams(Params):
    """AlexNet: five ReLU convolutions, overlapping max pooling, two big dense layers."""

    width: float = Field(0.25, gt=0.0, le=4.0, description="Scales filters and dense widths.")
    head: list[int] = Field(
        default_factory=lambda: [4096, 4096],
        description="Dense widths before the output (scaled by width).",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout after each dense layer.")
    batch_norm: bool = Field(False, description="Batch normalization after each convolution.")
    stem: Stem = Field(
        "auto",
        description="imagenet: 11x11 stride-4 first convolution; small: 5x5 stride 1; "
        "auto: imagenet from 64x64 up.",
    )


@hookimpl
def register_models(register):
    register(
        "alexnet", build="dlpipe.models.alexnet.model:build", params=AlexNetParams,
        description="AlexNet, scaled by a width multiplier: ReLU, dropout, overlapping pooling.",
        example_params={"width": 0.05, "head": [64, 64]}, task="classification",
    )
