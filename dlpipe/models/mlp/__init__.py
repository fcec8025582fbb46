"""``mlp``: a multilayer perceptron for images or tables.

The Keras code is in :mod:`dlpipe.models.mlp.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class MLPParams(Params):
    """Flatten, then Dense -> norm -> activation -> dropout blocks, then a softmax."""

    hidden: list[int] | None = Field(
        None, description="Hidden layer widths, one per layer; overrides width and depth."
    )
    width: int = Field(128, ge=1, description="Units per hidden layer (when hidden is unset).")
    depth: int = Field(2, ge=0, description="Number of hidden layers (when hidden is unset).")
    activation: str = Field("relu", description="Keras activation of the hidden layers.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    norm: Literal["none", "batch", "layer", "instance"] = Field(
        "none", description="Normalization after each hidden Dense layer."
    )

    @model_validator(mode="after")
    def _widths(self) -> MLPParams:
        if self.hidden is not None and any(w < 1 for w in self.hidden):
            raise ValueError("hidden widths must be positive")
        return self


@hookimpl
def register_models(register):
    register(
        "mlp", build="dlpipe.models.mlp.model:build", params=MLPParams,
        description="Multilayer perceptron for images or tables.",
        example_params={"hidden": [16, 8], "norm": "batch"}, task="classification",
    )
