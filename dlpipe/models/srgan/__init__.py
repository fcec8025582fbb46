"""``srgan``: adversarial super-resolution (perceptual + adversarial loss).

The Keras code is in :mod:`dlpipe.models.srgan.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.espcn import SuperResParams


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
        "srgan",
        build="dlpipe.models.srgan.model:build",
        params=SRGANParams,
        description="SRGAN super-resolution: content + adversarial loss (two optimizers).",
        task="generative",
        loss_weights=("content", "adversarial"),
        plots="dlpipe.models.espcn.plots:plots",
        callbacks="dlpipe.models.srgan.model:callbacks",
        example_params={
            "scale": 2,
            "filters": 8,
            "residual_blocks": 1,
            "d_filters": [8],
            "d_dense": 8,
            "sample_every": 0,
        },
        xla=False,  # espcn's test_step: XLA has no kernel for its bicubic baseline
    )
