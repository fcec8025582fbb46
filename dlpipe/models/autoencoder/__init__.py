"""``autoencoder``: dense or convolutional, denoising with ``noise_std > 0``.

The Keras code is in :mod:`dlpipe.models.autoencoder.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.fields import Activation
from dlpipe.params import Params


class AutoencoderParams(Params):
    """Encoder and decoder, dense or convolutional; denoising with ``noise_std > 0``."""

    encoder: Literal["dense", "conv"] = Field("dense", description="Network family.")
    latent_dim: int = Field(16, ge=1, description="Size of the code; > 2 is shown via PCA.")
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64],
        description="Dense widths (dense) or conv filters per stride-2 block (conv).",
    )
    activation: str = Field("relu", description="Hidden activation.")
    reconstruction: Literal["mse", "bce"] = Field(
        "mse", description="Reconstruction loss, summed over values; bce needs [0, 1] data."
    )
    noise_std: float = Field(
        0.0, ge=0.0, description="Denoising: std of Gaussian noise added to inputs in training."
    )
    output_activation: Activation = Field(
        "auto", description="auto: sigmoid for [0, 1] data, tanh for [-1, 1], else linear."
    )


@hookimpl
def register_models(register):
    register(
        "autoencoder",
        build="dlpipe.models.autoencoder.model:build",
        params=AutoencoderParams,
        description="Autoencoder, dense or conv, optionally denoising.",
        task="generative",
        loss_weights=("reconstruction",),
        plots="dlpipe.models.autoencoder.plots:plots",
        example_params={"hidden": [16, 8], "latent_dim": 4, "noise_std": 0.1},
    )
