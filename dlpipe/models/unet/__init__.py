"""``unet``: the U-Net for semantic segmentation.

The Keras code is in :mod:`dlpipe.models.unet.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class UNetParams(Params):
    """A U-Net (Ronneberger et al., 2015) sized for small images."""

    depth: int = Field(
        3, ge=1, le=6,
        description="Down-sampling steps (2x2 max pooling); image sides must divide by 2**depth.",
    )
    base_filters: int = Field(
        16, ge=1, description="Filters of the first level; doubled at every level down."
    )
    skip_connections: bool = Field(
        True,
        description="Concatenate each encoder level's features into the decoder (U-Net); "
        "false: a plain encoder-decoder, to see what the skips buy.",
    )
    convs_per_block: int = Field(2, ge=1, le=4, description="3x3 convolutions per block.")
    batchnorm: bool = Field(True, description="Batch normalization after every convolution.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Spatial dropout (whole feature maps) at the end of every conv block.",
    )
    upsampling: Literal["transpose", "bilinear", "nearest"] = Field(
        "transpose",
        description="transpose: 2x2 stride-2 transposed convolution; bilinear/nearest: "
        "UpSampling2D followed by a 3x3 convolution.",
    )
    activation: str = Field("relu", description="Activation of the convolutions.")


@hookimpl
def register_models(register):
    register(
        "unet",
        build="dlpipe.models.unet.model:build",
        params=UNetParams,
        description="U-Net for semantic segmentation (per-pixel softmax; skips optional).",
        task="segmentation",
        example_params={"depth": 2, "base_filters": 4, "dropout": 0.1},
        example_data="dlpipe.models.unet.model:example_data",
    )
