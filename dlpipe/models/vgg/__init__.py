"""``vgg``: VGG-11/13/16/19.

The Keras code is in :mod:`dlpipe.models.vgg.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.fields import width_field
from dlpipe.params import Params


class VGGParams(Params):
    """VGG: blocks of 3x3 convolutions and max pooling, then a dense head."""

    depth: Literal[11, 13, 16, 19] = Field(16, description="VGG-11, -13, -16 or -19.")
    width: float = width_field()
    batch_norm: bool = Field(False, description="Batch normalization after each convolution.")
    head: list[int] = Field(
        default_factory=lambda: [4096, 4096],
        description="Dense widths of the classifier head ([] for none).",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout after each head layer.")
    pooling: Literal["flatten", "avg", "max"] = Field(
        "flatten", description="How the last feature map becomes a vector."
    )


@hookimpl
def register_models(register):
    register(
        "vgg", build="dlpipe.models.vgg.model:build", params=VGGParams,
        description="VGG-11/13/16/19: stacked 3x3 convolutions, optional batch norm.",
        example_params={"depth": 11, "width": 0.0625, "head": [16], "batch_norm": True},
        task="classification",
    )
