"""``inception``: GoogLeNet / Inception v1 with auxiliary classifiers.

The Keras code is in :mod:`dlpipe.models.inception.model`. Its loss weights are
``main``, ``aux1`` and ``aux2``.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.models.fields import Stem, width_field
from dlpipe.params import Params


class InceptionParams(Params):
    """GoogLeNet: nine inception blocks, global average pooling, auxiliary classifiers."""

    width: float = width_field()
    blocks: tuple[int, int, int] = Field(
        (2, 5, 2),
        description="Inception blocks in groups 3, 4 and 5 (GoogLeNet: [2, 5, 2], the most).",
    )
    aux_heads: bool = Field(
        True,
        description="Auxiliary classifiers after blocks 4a and 4d (loss terms aux1, aux2).",
    )
    aux_weight: float = Field(
        0.3,
        ge=0.0,
        description="Initial weight of each auxiliary loss term; train.loss_weights.aux1 "
        "and .aux2 override it.",
    )
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="Dropout before the main output.")
    aux_dropout: float = Field(0.7, ge=0.0, lt=1.0, description="Dropout in the auxiliary heads.")
    batch_norm: bool = Field(True, description="Batch normalization after each convolution.")
    stem: Stem = Field(
        "auto",
        description="imagenet: the paper's stem (7x7 stride 2 and two poolings); small: two "
        "3x3 convolutions and one pooling; auto: imagenet from 64x64 up.",
    )


    @model_validator(mode="after")
    def _blocks(self) -> InceptionParams:
        if not all(1 <= n <= most for n, most in zip(self.blocks, (2, 5, 2), strict=True)):
            raise ValueError(f"blocks must be between [1, 1, 1] and [2, 5, 2], got {list(self.blocks)}")
        return self


@hookimpl
def register_models(register):
    register(
        "inception", build="dlpipe.models.inception.model:build", params=InceptionParams,
        description="GoogLeNet / Inception v1 with auxiliary classifiers (named loss terms).",
        loss_weights=("main", "aux1", "aux2"),
        example_params={"width": 0.0625, "blocks": [1, 2, 1]}, task="classification",
    )
