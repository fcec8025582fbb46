"""``transformer``: the encoder-decoder Transformer.

The Keras code is in :mod:`dlpipe.models.transformer.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class TransformerParams(Params):
    """Transformer encoder-decoder."""

    d_model: int = Field(64, ge=2, description="Model width.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    encoder_layers: int = Field(2, ge=1, description="Encoder blocks.")
    decoder_layers: int = Field(2, ge=1, description="Decoder blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Residual and embedding dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Positional encodings: fixed sinusoids or learned embeddings."
    )

    @model_validator(mode="after")
    def _heads(self) -> TransformerParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


@hookimpl
def register_models(register):
    register(
        "transformer",
        build="dlpipe.models.transformer.model:build",
        params=TransformerParams,
        description="Transformer encoder-decoder with sinusoidal or learned positions.",
        task="seq2seq",
        plots="dlpipe.models.transformer.model:plots",
        example_params={"d_model": 16, "num_heads": 2, "ff_dim": 32, "encoder_layers": 1,
                        "decoder_layers": 1},
        example_data="dlpipe.datasets.sequences:example_bundle",
    )
