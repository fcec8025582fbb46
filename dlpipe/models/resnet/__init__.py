"""``resnet``: ResNet-18/34 (basic blocks) and 50/101/152 (bottlenecks).

The Keras code is in :mod:`dlpipe.models.resnet.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.fields import Stem, width_field
from dlpipe.params import Params


class ResNetParams(Params):
    """ResNet: residual basic (18/34) or bottleneck (50/101/152) blocks."""

    depth: Literal[18, 34, 50, 101, 152] = Field(18, description="Number of layers.")
    width: float = width_field()
    stem: Stem = Field(
        "auto",
        description="imagenet: 7x7 stride-2 convolution and max pooling; small: one 3x3 "
        "stride-1 convolution (CIFAR-style); auto: imagenet from 64x64 up.",
    )
    zero_init_residual: bool = Field(
        True, description="Start each block's last batch-norm scale at 0 (blocks start as identity)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the output layer.")


@hookimpl
def register_models(register):
    register(
        "resnet", build="dlpipe.models.resnet.model:build", params=ResNetParams,
        description="ResNet-18/34 (basic blocks), 50/101/152 (bottlenecks).",
        example_params={"depth": 18, "width": 0.125}, task="classification",
    )
