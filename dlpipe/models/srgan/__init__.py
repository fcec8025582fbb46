"""Super-resolution architecture plugins: ESPCN (sub-pixel) and SRGAN.

The code lives in :mod:`dlpipe.models.espcn.model` and :mod:`dlpipe.models.srgan.model` (PSNR and
SSIM in :mod:`dlpipe.models.image_quality`); this module only declares parameters and
registers ``"module:function"`` strings, so it imports neither Keras nor TensorFlow.

Both models train on the data stage's (high-resolution) images: they downsample each
batch by ``scale`` themselves and learn to upscale it back. They are registered with
task ``generative``: ``model(x)`` returns the reconstruction of ``x`` from its
low-resolution version, shaped like ``x``; ``model.upscale(lr)`` upscales real
low-resolution images.
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


class SRGANParams(SuperResParams):
    """SRGAN: an SRResNet generator trained with content (pixel MSE) + adversarial loss
    (loss terms ``content`` and ``adversarial``, default weights 1 and 0.001)."""

    scale: Literal[2, 4] = Field(4, description="Upscaling factor (a power of 2).")
    filters: int = Field(64, ge=1, description="Generator width.")
    residual_blocks: int = Field(
        8, ge=0, description="Generator residual blocks (16 in the paper)."
    )
    batchnorm: bool = Field(
        False, description="Batch norm in the residual blocks (the paper; ESRGAN drops it)."
    )
    d_filters: list[int] = Field(
        default_factory=lambda: [32, 64, 128],
        description="Discriminator: filters per (conv, stride-2 conv) pair.",
    )
    d_dense: int = Field(256, ge=1, description="Discriminator: width of the dense layer.")
    d_learning_rate: float | None = Field(
        None, gt=0, description="Discriminator learning rate; null: train.optimizer's."
    )
    adam_betas: tuple[float, float] | None = Field(
        (0.9, 0.999),
        description="Adam's (beta_1, beta_2) for both optimizers (the paper's defaults); "
        "null keeps train.optimizer's. Ignored for non-Adam optimizers.",
    )
    pretrain_epochs: int = Field(
        0, ge=0, description="First train the generator on the content loss alone this many epochs."
    )




@hookimpl
def register_models(register):
    register(
        "espcn",
        build="dlpipe.models.espcn.model:build",
        params=ESPCNParams,
        description="ESPCN super-resolution (sub-pixel conv), PSNR/SSIM vs bicubic.",
        task="generative",
        loss_weights=("content",),
        plots="dlpipe.models.espcn.model:plots",
        callbacks="dlpipe.models.espcn.model:callbacks",
        example_params={"scale": 2, "filters": [8, 4], "kernel_sizes": [3, 3], "sample_every": 0},
    )
    register(
        "srgan",
        build="dlpipe.models.srgan.model:build",
        params=SRGANParams,
        description="SRGAN super-resolution: content + adversarial loss (two optimizers).",
        task="generative",
        loss_weights=("content", "adversarial"),
        plots="dlpipe.models.srgan.model:plots",
        callbacks="dlpipe.models.srgan.model:callbacks",
        example_params={
            "scale": 2,
            "filters": 8,
            "residual_blocks": 1,
            "d_filters": [8],
            "d_dense": 8,
            "sample_every": 0,
        },
    )
