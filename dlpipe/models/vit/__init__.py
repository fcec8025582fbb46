"""``vit``: the Vision Transformer.

The Keras code is in :mod:`dlpipe.models.vit.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class ViTParams(Params):
    """Patch embedding, [cls] token, learned positions, pre-LN encoder blocks."""

    patch_size: int = Field(
        4, ge=1, description="Side of the square patches (the patch-embedding Conv2D's kernel "
        "and stride); must divide the image height and width."
    )
    d_model: int = Field(64, ge=2, description="Token width (hidden size).")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    mlp_dim: int = Field(128, ge=1, description="Hidden units of each block's GELU MLP.")
    depth: int = Field(4, ge=1, description="Number of encoder blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Embedding, attention-output and "
                           "MLP dropout.")
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the "
                                "classification head.")

    @model_validator(mode="after")
    def _heads(self) -> ViTParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


@hookimpl
def register_models(register):
    register(
        "vit",
        build="dlpipe.models.vit.model:build",
        params=ViTParams,
        description="Vision Transformer: strided-conv patch embedding, [cls] token, learned "
        "positions, pre-LayerNorm encoder blocks.",
        task="classification",
        plots="dlpipe.models.vit.plots:plots",
        # The conformance test's random images are 8x8: 2x2 patches give 16 tokens.
        example_params={"patch_size": 2, "d_model": 16, "num_heads": 2, "mlp_dim": 32,
                        "depth": 1},
    )
