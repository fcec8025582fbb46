"""``captioner``: a BLIP-style image captioner.

The Keras code is in :mod:`dlpipe.models.captioner.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.models.clip import ImageTextParams

_TINY = {"filters": [4], "num_heads": 2, "ff_dim": 16, "dropout": 0.0}


class CaptionerParams(ImageTextParams):
    """CNN image tokens + transformer caption decoder with cross-attention."""

    d_model: int = Field(64, ge=2, description="Decoder width (and image token width).")
    decoder_layers: int = Field(2, ge=1, description="Transformer decoder blocks.")

    @model_validator(mode="after")
    def _check(self) -> CaptionerParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


@hookimpl
def register_models(register):
    register(
        "captioner",
        build="dlpipe.models.captioner.model:build",
        params=CaptionerParams,
        description="BLIP-style captioner: CNN image tokens, transformer decoder with "
        "cross-attention; greedy or beam captions.",
        task="seq2seq",
        plots="dlpipe.models.captioner.plots:plots",
        example_params={**_TINY, "d_model": 8, "decoder_layers": 1},
        example_data="dlpipe.datasets.captions:example_bundle",
    )
