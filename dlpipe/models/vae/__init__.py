"""``vae``: the variational autoencoder (a beta-VAE via the ``kl`` loss weight).

The Keras code is in :mod:`dlpipe.models.vae.model`. Its loss weights are
``reconstruction`` and ``kl``.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params

_TINY = {"hidden": [16, 8], "latent_dim": 2}


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
    kl_warmup_epochs: int = Field(
        0,
        ge=0,
        description="KL warm-up: raise the kl loss weight linearly from 0 to "
        "train.loss_weights.kl over this many epochs (0: off). Logged as kl_weight.",
    )
    sample_every: int = Field(
        0, ge=0, description="Log a fixed-seed sample grid every N epochs (0: only at the end)."
    )


@hookimpl
def register_models(register):
    register(
        "vae",
        build="dlpipe.models.vae.model:build",
        params=VAEParams,
        description="Variational autoencoder (beta-VAE via the kl loss weight, KL warm-up).",
        task="generative",
        loss_weights=("reconstruction", "kl"),
        plots="dlpipe.models.vae.plots:plots",
        callbacks="dlpipe.models.vae.model:callbacks",
        example_params=dict(_TINY),
    )
