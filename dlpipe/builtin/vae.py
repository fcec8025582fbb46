"""The variational autoencoder architecture plugin (code in :mod:`dlpipe.models.vae`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class VAEParams(Params):
    """Encoder and decoder, dense or convolutional, with a Gaussian latent."""

    encoder: Literal["dense", "conv"] = Field("dense", description="Network family.")
    latent_dim: int = Field(2, ge=1, description="Latent size; 2 gives the manifold plot.")
    hidden: list[int] = Field(
        default_factory=lambda: [256, 128],
        description="Dense widths (dense) or conv filters per stride-2 block (conv).",
    )
    activation: str = Field("relu", description="Hidden activation.")
    reconstruction: Literal["bce", "mse"] = Field(
        "bce", description="Reconstruction loss, summed over pixels."
    )


@hookimpl
def register_models(register):
    register(
        "vae",
        build="dlpipe.models.vae:build",
        params=VAEParams,
        description="Variational autoencoder (beta-VAE via the kl loss weight).",
        task="generative",
        loss_terms=("reconstruction", "kl"),
        plots="dlpipe.models.vae:plots",
        example_params={"hidden": [16, 8], "latent_dim": 2},
    )
