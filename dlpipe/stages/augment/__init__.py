"""Built-in augmentation stage: Keras preprocessing layers inside the input pipeline."""

from __future__ import annotations

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class KerasAugmentParams(Params):
    """Each option adds one Keras preprocessing layer; applied to the training split only."""

    flip: str | None = Field(
        None, description="horizontal, vertical or horizontal_and_vertical (RandomFlip)."
    )
    rotation: float | None = Field(None, ge=0, le=1, description="RandomRotation factor (fraction of 2*pi).")
    zoom: float | None = Field(None, ge=0, lt=1, description="RandomZoom height factor.")
    translation: float | None = Field(None, ge=0, lt=1, description="RandomTranslation factor.")
    contrast: float | None = Field(None, ge=0, lt=1, description="RandomContrast factor.")
    noise: float | None = Field(None, ge=0, description="GaussianNoise standard deviation.")
    seed: int | None = Field(None, description="Layer seed. Default: the pipeline's seed.")


@hookimpl
def register_stages(register):
    register("augment", "keras_layers", "dlpipe.stages.augment.stage:keras_layers", KerasAugmentParams,
             "Flip, rotation, zoom, translation, contrast and noise layers (training split only).")
