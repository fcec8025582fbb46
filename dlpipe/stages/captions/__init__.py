"""The ``captions`` data stage: image-caption pairs generated from a seed.

The stage function is in :mod:`dlpipe.stages.captions.stage`, the generators in
:mod:`dlpipe.datasets.captions`. This module declares the parameters and registers
``"module:function"`` strings, so importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.stages.data import SplitParams


class CaptionsParams(SplitParams):
    """Image-caption pairs generated from a seed: captioned digits or shapes."""

    source: Literal["digits", "shapes"] = Field(
        "digits", description="digits: scikit-learn's 8x8 digits ('a handwritten seven', "
        "'the number 7'); shapes: procedural coloured shapes ('a red circle')."
    )
    templates: list[str] | None = Field(
        None, min_length=1, description="Caption templates, one drawn per image (per object "
        "for shapes). Placeholders: {label}; digits {digit} {word}; shapes {color} {shape}. "
        "Default: digits 'a handwritten {word}', 'the number {digit}', 'a picture of a "
        "{digit}'; shapes 'a {color} {shape}'."
    )
    tokenizer: Literal["word", "char"] = Field(
        "word", description="Caption tokens: words (split on spaces) or characters."
    )
    caption_length: int | None = Field(
        None, ge=2, description="Token positions per caption, END included (default: the "
        "longest caption's). Models read at most this many, so leave room for longer "
        "zero-shot prompts."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="digits: resize the 8x8 images to [height, width] (e.g. [16, 16])."
    )
    n: int = Field(2000, ge=10, description="shapes: number of images generated.")
    size: int = Field(32, ge=8, le=256, description="shapes: image side in pixels (RGB).")
    label: Literal["shape", "color", "shape_color"] = Field(
        "shape_color", description="shapes: the class of an image (its first object), for "
        "zero-shot evaluation and label-matched contrastive positives."
    )
    max_objects: int = Field(
        1, ge=1, le=4, description="shapes: 1..N objects per image; several make captions "
        "like 'a red circle and a blue square'."
    )
    min_size: float = Field(0.3, gt=0.0, le=1.0, description="shapes: smallest shape side, "
                            "as a share of the image.")
    max_size: float = Field(0.6, gt=0.0, le=1.0, description="shapes: largest shape side.")
    noise: float = Field(0.02, ge=0.0, description="shapes: std of Gaussian pixel noise.")
    background: Literal["dark", "light", "random"] = Field("dark", description="shapes: "
                                                           "background grey level.")

    @model_validator(mode="after")
    def _sizes(self) -> CaptionsParams:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


@hookimpl
def register_stages(register):
    register("data", "captions", "dlpipe.stages.captions.stage:captions", CaptionsParams,
             "Image-caption pairs (captioned digits or shapes), word tokens, class labels.")
