"""``espcn``: sub-pixel convolution super-resolution.

The Keras code is in :mod:`dlpipe.models.espcn.model`. The model downsamples each
batch by ``scale`` itself and learns to upscale it back; ``model.upscale(lr)`` upscales
real low-resolution images. :class:`SuperResParams` is shared with ``srgan``.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class SuperResParams(Params):
    """What both super-resolution models share."""

    degradation: Literal["area", "bilinear"] = Field(
        "area",
        description="How the low-res input is made from each image: area (mean of each "
        "scale x scale block) or bilinear (antialiased resize).",
    )
    sample_every: int = Field(
        5,
        ge=0,
        description="Log a low-res/bicubic/model/truth grid every N epochs (0: only at the end).",
    )


class ESPCNParams(SuperResParams):
    """ESPCN: convolutions at low resolution, then one sub-pixel (depth-to-space) step."""

    scale: Literal[2, 3, 4] = Field(
        2, description="Upscaling factor; image sides must divide by it."
    )
    filters: list[int] = Field(
        default_factory=lambda: [64, 32],
        description="Filters of the feature convolutions before the sub-pixel convolution.",
    )
    kernel_sizes: list[int] = Field(
        default_factory=lambda: [5, 3], description="Kernel size of each feature convolution."
    )
    activation: str = Field("tanh", description="Hidden activation (tanh in the paper).")

    @model_validator(mode="after")
    def _layers(self) -> ESPCNParams:
        if len(self.filters) != len(self.kernel_sizes):
            raise ValueError(
                f"filters has {len(self.filters)} entries but kernel_sizes has "
                f"{len(self.kernel_sizes)}; give one kernel size per convolution"
            )
        if any(f < 1 for f in self.filters) or any(k < 1 for k in self.kernel_sizes):
            raise ValueError("filters and kernel_sizes must be positive")
        return self


@hookimpl
def register_models(register):
    register(
        "espcn",
        build="dlpipe.models.espcn.model:build",
        params=ESPCNParams,
        description="ESPCN super-resolution (sub-pixel conv), PSNR/SSIM vs bicubic.",
        task="generative",
        loss_weights=("content",),
        plots="dlpipe.models.espcn.plots:plots",
        callbacks="dlpipe.models.espcn.model:callbacks",
        example_params={"scale": 2, "filters": [8, 4], "kernel_sizes": [3, 3], "sample_every": 0},
        xla=False,  # the bicubic baseline of test_step: XLA has no ResizeBicubic kernel
    )
