"""``transformer_classifier``: a Transformer encoder that classifies token sequences.

The Keras code is in :mod:`dlpipe.models.transformer_classifier.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class TransformerClassifierParams(Params):
    """Transformer encoder over token ids, pooled to a softmax classifier."""

    d_model: int = Field(64, ge=2, description="Model width.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    num_layers: int = Field(2, ge=1, description="Encoder blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Embedding, residual and head "
                           "dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Positional encodings: fixed sinusoids or learned embeddings."
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="cls: the final vector of a [cls] token put in front; mean: the "
        "average over the real (non-padding) tokens."
    )

    @model_validator(mode="after")
    def _heads(self) -> TransformerClassifierParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


@hookimpl
def register_models(register):
    register(
        "transformer_classifier",
        build="dlpipe.models.transformer_classifier.model:build",
        params=TransformerClassifierParams,
        description="Transformer encoder text classifier: [cls] or mean pooling, padding "
        "masked, sinusoidal or learned positions.",
        task="classification",
        plots="dlpipe.models.transformer_classifier.plots:plots",
        example_params={"d_model": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
        example_data="dlpipe.datasets.sequences:arith_example_bundle",
    )
