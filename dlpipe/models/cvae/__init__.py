"""``cvae``: the conditional VAE; encoder and decoder also see the class.

The Keras code is in :mod:`dlpipe.models.cvae.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from dlpipe import hookimpl
from dlpipe.models.vae import VAEParams

_TINY = {"hidden": [16, 8], "latent_dim": 2}


class CVAEParams(VAEParams):
    """A VAE whose encoder and decoder also take the one-hot class label."""


@hookimpl
def register_models(register):
    register(
        "cvae",
        build="dlpipe.models.cvae.model:build",
        params=CVAEParams,
        description="Conditional VAE: encoder and decoder see the class; sample by class.",
        task="generative",
        loss_weights=("reconstruction", "kl"),
        plots="dlpipe.models.cvae.plots:plots",
        callbacks="dlpipe.models.cvae.model:callbacks",
        example_params={**_TINY, "kl_warmup_epochs": 2},
    )
