"""``wgan_gp``: the Wasserstein GAN with gradient penalty.

The Keras code is in :mod:`dlpipe.models.wgan_gp.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.gan import AdversarialParams

_TINY = {"latent_dim": 8, "filters": [8, 4], "sample_every": 0}


class WGANGPParams(AdversarialParams):
    """WGAN-GP; the penalty weight is the loss term ``gp`` (train.loss_weights.gp, default 10)."""

    critic_steps: int = Field(5, ge=1, le=20, description="Critic updates per generator update.")
    adam_betas: tuple[float, float] | None = Field(
        (0.5, 0.9),
        description="Adam's (beta_1, beta_2) for both optimizers (0.5, 0.9 as in keras-io's "
        "WGAN-GP); null keeps train.optimizer's. Ignored for non-Adam optimizers.",
    )


@hookimpl
def register_models(register):
    register(
        "wgan_gp",
        build="dlpipe.models.wgan_gp.model:build",
        params=WGANGPParams,
        description="Wasserstein GAN with gradient penalty (loss term gp).",
        task="generative",
        loss_weights=("gp",),
        plots="dlpipe.models.gan.plots:plots",
        callbacks="dlpipe.models.wgan_gp.model:callbacks",
        example_params={**_TINY, "critic_steps": 2},
    )
