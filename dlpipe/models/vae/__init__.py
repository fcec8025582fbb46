"""Variational autoencoder plugins: ``vae`` and the conditional ``cvae``.

The code is in :mod:`dlpipe.models.vae.model` and :mod:`dlpipe.models.cvae.model`; this module
only declares parameters and registers ``"module:function"`` strings, so it imports
neither Keras nor TensorFlow. A beta-VAE is the ``vae`` with ``train.loss_weights.kl``
other than 1 (usually with ``kl_warmup_epochs``).
"""

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
    kl_warmup_epochs: int = Field(
        0,
        ge=0,
        description="KL warm-up: raise the kl loss weight linearly from 0 to "
        "train.loss_weights.kl over this many epochs (0: off). Logged as kl_weight.",
    )
    sample_every: int = Field(
        0, ge=0, description="Log a fixed-seed sample grid every N epochs (0: only at the end)."
    )


class CVAEParams(VAEParams):
    """A VAE whose encoder and decoder also take the one-hot class label."""


_TINY = {"hidden": [16, 8], "latent_dim": 2}


@hookimpl
def register_models(register):
    register(
        "vae",
        build="dlpipe.models.vae.model:build",
        params=VAEParams,
        description="Variational autoencoder (beta-VAE via the kl loss weight, KL warm-up).",
        task="generative",
        loss_weights=("reconstruction", "kl"),
        plots="dlpipe.models.vae.model:plots",
        callbacks="dlpipe.models.vae.model:callbacks",
        example_params=dict(_TINY),
    )
    register(
        "cvae",
        build="dlpipe.models.cvae.model:build",
        params=CVAEParams,
        description="Conditional VAE: encoder and decoder see the class; sample by class.",
        task="generative",
        loss_weights=("reconstruction", "kl"),
        plots="dlpipe.models.cvae.model:plots",
        callbacks="dlpipe.models.cvae.model:callbacks",
        example_params={**_TINY, "kl_warmup_epochs": 2},
    )
