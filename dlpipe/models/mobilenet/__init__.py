"""``mobilenet``: depthwise-separable convolutions, dilation and groups.

The Keras code is in :mod:`dlpipe.models.mobilenet.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class MobileNetParams(Params):
    """MobileNet: depthwise-separable convolutions with optional dilation and groups."""

    width: float = Field(1.0, gt=0.0, le=4.0, description="Width multiplier alpha.")
    output_stride: Literal[8, 16, 32] | None = Field(
        None,
        description="Use dilated convolutions instead of downsampling beyond this total "
        "stride (null: never).",
    )
    groups: int = Field(
        1, ge=1, description="Groups of the pointwise convolutions (followed by a channel shuffle)."
    )
    stem_stride: Literal["auto", 1, 2] = Field(
        "auto", description="Stride of the first convolution; auto: 2 from 64x64 up."
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the output layer.")


@hookimpl
def register_models(register):
    register(
        "mobilenet", build="dlpipe.models.mobilenet.model:build", params=MobileNetParams,
        description="MobileNet: depthwise-separable convolutions, dilation, groups.",
        example_params={"width": 0.125, "groups": 2, "output_stride": 8}, task="classification",
    )
