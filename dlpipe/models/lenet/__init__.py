"""``lenet``: LeNet-5 (LeCun et al., 1998).

The Keras code is in :mod:`dlpipe.models.lenet.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class LeNetParams(Params):
    """LeNet-5: tanh convolutions with average pooling, then 120-84 dense layers."""

    filters: tuple[int, int] = Field((6, 16), description="Filters of C1 and C3.")
    units: tuple[int, int] = Field((120, 84), description="Units of C5 and F6.")
    activation: str = Field("tanh", description="Activation (tanh in the paper).")
    padding: Literal["auto", "valid", "same"] = Field(
        "auto",
        description="Convolution padding; auto is valid (the paper) for inputs of 32x32 "
        "and larger, same for smaller inputs.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the output layer.")
    norm: Literal["none", "batch", "layer", "instance"] = Field(
        "none",
        description="Normalization between each convolution and its activation (not in "
        "the paper): batch, layer (over height, width, channels) or instance (per channel).",
    )


@hookimpl
def register_models(register):
    register(
        "lenet", build="dlpipe.models.lenet.model:build", params=LeNetParams,
        description="LeNet-5: tanh convolutions, average pooling (LeCun et al., 1998).",
        example_params={"filters": [4, 8], "units": [16, 8]}, task="classification",
    )
