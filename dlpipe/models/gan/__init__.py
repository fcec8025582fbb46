"""``gan`` and ``cgan``: DCGAN-style or dense GANs, unconditional and conditional.

The Keras code is in :mod:`dlpipe.models.gan.model`; the adversarial training step it
shares with ``wgan_gp`` and ``srgan`` is in :mod:`dlpipe.models.adversarial`.
:class:`AdversarialParams` is the params base those architectures share.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.models.fields import Activation
from dlpipe.params import Params

_TINY = {"latent_dim": 8, "filters": [8, 4], "sample_every": 0}


class AdversarialParams(Params):
    """What every GAN here shares: the networks and the discriminator's optimizer."""

    architecture: Literal["conv", "dense"] = Field(
        "conv", description="conv: DCGAN-style (images only); dense: MLPs."
    )
    latent_dim: int = Field(64, ge=1, description="Size of the generator's noise vector.")
    filters: list[int] = Field(
        default_factory=lambda: [128, 64],
        description="conv: filters per stride-2 block, coarse to fine (image sides must "
        "divide by 2**len); dense: hidden widths.",
    )
    batchnorm: bool = Field(True, description="Batch normalization in the generator.")
    output_activation: Activation = Field(
        "auto", description="auto: tanh for [-1, 1] data, sigmoid for [0, 1], else linear."
    )
    d_learning_rate: float | None = Field(
        None, gt=0, description="Discriminator/critic learning rate; null: train.optimizer's."
    )
    adam_betas: tuple[float, float] | None = Field(
        (0.5, 0.999),
        description="Adam's (beta_1, beta_2) for both optimizers (GANs want beta_1 = 0.5); "
        "null keeps train.optimizer's. Ignored for non-Adam optimizers.",
    )
    sample_every: int = Field(
        5, ge=0, description="Log a fixed-noise sample grid every N epochs (0: only at the end)."
    )


class GANBaseParams(AdversarialParams):
    dropout: float = Field(
        0.3, ge=0.0, lt=1.0, description="Dropout before the discriminator's logit."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="One-sided: real targets become 1 - label_smoothing."
    )
    label_noise: float = Field(
        0.0, ge=0.0, lt=0.5, description="Probability of flipping each discriminator target."
    )


class GANParams(GANBaseParams):
    """A DCGAN-style GAN; ``conditional: true`` makes it a conditional GAN."""

    conditional: bool = Field(False, description="Condition both networks on the class label.")


class CGANParams(GANBaseParams):
    """A conditional GAN: generator and discriminator take the class label."""


@hookimpl
def register_models(register):
    register(
        "gan",
        build="dlpipe.models.gan.model:build",
        params=GANParams,
        description="DCGAN-style GAN (two optimizers, label smoothing/noise; conditional option).",
        task="generative",
        loss_weights=("discriminator", "generator"),
        plots="dlpipe.models.gan.plots:plots",
        callbacks="dlpipe.models.gan.model:callbacks",
        example_params={**_TINY, "label_smoothing": 0.1, "label_noise": 0.05},
    )
    register(
        "cgan",
        build="dlpipe.models.gan.model:build_conditional",
        params=CGANParams,
        description="Conditional GAN: class-controlled samples.",
        task="generative",
        loss_weights=("discriminator", "generator"),
        plots="dlpipe.models.gan.plots:plots",
        callbacks="dlpipe.models.gan.model:callbacks",
        example_params=dict(_TINY),
    )
