"""``clip``: a CLIP-style image-text dual encoder (symmetric InfoNCE).

The Keras code is in :mod:`dlpipe.models.clip.model`. :class:`ImageTextParams` is shared
with ``captioner``.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params

_TINY = {"filters": [4], "num_heads": 2, "ff_dim": 16, "dropout": 0.0}


class ImageTextParams(Params):
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide the width.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Embedding and residual dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Caption positions: fixed sinusoids or learned embeddings."
    )
    filters: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=1,
        description="Image encoder: filters per stride-2 CNN stage (each halves the grid).",
    )


class CLIPParams(ImageTextParams):
    """CLIP-style dual encoder trained with the symmetric InfoNCE loss."""

    embed_dim: int = Field(64, ge=2, description="Size of the shared embedding space.")
    width: int = Field(64, ge=2, description="Text encoder width (and image token width).")
    text_layers: int = Field(2, ge=1, description="Transformer encoder blocks over captions.")
    temperature: Literal["learnable"] | float = Field(
        "learnable", description="learnable: a trained log(1/T) (CLIP); a number: fixed T > 0."
    )
    init_temperature: float = Field(0.07, gt=0.0, description="Starting T when learnable.")
    max_logit_scale: float = Field(100.0, gt=1.0, description="Upper clip of 1/T (learnable).")
    positives: Literal["label", "caption", "pair"] = Field(
        "label", description="Which in-batch pairs count as matches: same class (label), "
        "identical caption ids (caption), or only each image's own caption (pair)."
    )

    @model_validator(mode="after")
    def _check(self) -> CLIPParams:
        if not isinstance(self.temperature, str) and self.temperature <= 0:
            raise ValueError("temperature must be 'learnable' or a number above 0")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        return self


@hookimpl
def register_models(register):
    register(
        "clip",
        build="dlpipe.models.clip.model:build",
        params=CLIPParams,
        description="CLIP-style dual encoder (CNN image, transformer text), symmetric "
        "InfoNCE with a learnable or fixed temperature.",
        task="contrastive",
        loss_weights=("image_to_text", "text_to_image"),
        plots="dlpipe.models.clip.plots:plots",
        example_params={**_TINY, "embed_dim": 8, "width": 8, "text_layers": 1},
        example_data="dlpipe.datasets.captions:example_bundle",
    )
