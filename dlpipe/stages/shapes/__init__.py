"""Procedural shapes datasets (classification, segmentation, detection): no network.

The stage functions are in :mod:`dlpipe.stages.shapes.stage`, the generator in
:mod:`dlpipe.datasets.shapes`; images are drawn at ``size`` directly, deterministically
from the split seed (default: the pipeline's seed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.stages.data import SplitParams


class ShapesBase(SplitParams):
    n: int = Field(2000, ge=10, description="Number of images to generate.")
    size: int = Field(32, ge=8, le=256, description="Image side in pixels (RGB).")
    min_size: float = Field(0.3, gt=0.0, le=1.0, description="Smallest shape side, as a share of the image.")
    max_size: float = Field(0.6, gt=0.0, le=1.0, description="Largest shape side, as a share of the image.")
    noise: float = Field(0.05, ge=0.0, description="Std of Gaussian pixel noise.")

    @model_validator(mode="after")
    def _sizes(self) -> ShapesBase:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


class ShapesParams(ShapesBase):
    """One circle, square or triangle per image, in one of four colours."""

    label: Literal["shape", "color", "shape_color"] = Field(
        "shape", description="What the class is: shape (3), color (4) or both (12)."
    )
    background: Literal["dark", "light", "random"] = "dark"
    noise: float = Field(0.02, ge=0.0, description="Std of Gaussian pixel noise.")


class ShapesSceneParams(ShapesBase):
    min_objects: int = Field(1, ge=1, description="Fewest shapes per image.")
    max_objects: int = Field(3, ge=1, le=16, description="Most shapes per image.")
    min_size: float = Field(0.2, gt=0.0, le=1.0, description="Smallest shape side, as a share of the image.")
    max_size: float = Field(0.45, gt=0.0, le=1.0, description="Largest shape side, as a share of the image.")

    @model_validator(mode="after")
    def _counts(self) -> ShapesSceneParams:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must not exceed max_objects")
        return self


@hookimpl
def register_stages(register):
    register("data", "shapes", "dlpipe.stages.shapes.stage:shapes", ShapesParams,
             "Procedural coloured circles, squares and triangles (classification).")
    register("data", "shapes_segmentation", "dlpipe.stages.shapes.stage:shapes_segmentation", ShapesSceneParams,
             "Procedural shapes on noisy backgrounds with per-pixel masks (segmentation).")
    register("data", "shapes_detection", "dlpipe.stages.shapes.stage:shapes_detection", ShapesSceneParams,
             "Procedural shapes with class boxes (detection).")
