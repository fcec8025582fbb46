"""WGAN-GP (Gulrajani et al., 2017) for the ``wgan_gp`` architecture.

In the spirit of the keras-io example ``generative/wgan_gp.py``: the discriminator is a
*critic* with an unbounded score, trained to maximise the Wasserstein estimate
``E[critic(real)] - E[critic(fake)]`` while a gradient penalty keeps it close to
1-Lipschitz: ``E[(||grad critic(x_hat)|| - 1)^2]`` at random interpolations ``x_hat``
between real and generated images (:func:`gradient_penalty`). The critic takes
``critic_steps`` updates per generator update; the generator maximises the critic's
score of its samples.

The penalty's weight is the named loss term ``gp`` (default 10, as in the paper):
``train.loss_weights.gp`` sets it and the tune stage can search it. Training reports
``d_loss`` (the critic's loss, weighted penalty included), ``g_loss``,
``wasserstein`` (the estimate, on the last critic step) and ``gp`` (the unweighted
penalty). Optimizers, sampling (``generate_samples``) and saving are
:mod:`dlpipe.models.adversarial`'s; the networks and sample grids are the GAN's
(:mod:`dlpipe.models.gan.model`, :mod:`dlpipe.models.gan.plots`).

Under ``precision: mixed_float16`` the critic computes in float16 but its score is
float32, and the penalty is formed in float32 from the float32 interpolations; the
critic's and the generator's losses are each scaled by their own
``LossScaleOptimizer``. The inner gradient (of the score with respect to the
interpolated images) is of order one per example, well inside float16's range, so it
needs no scaling of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.models.adversarial import AdversarialModel
from dlpipe.models.common import apply_gradients, replica_scaled
from dlpipe.models.gan import model as gan
from dlpipe.models.grids import value_range_of
from dlpipe.models.wgan_gp import WGANGPParams

callbacks = gan.callbacks  # the registered hook: the GAN's fixed-noise sample grids


def gradient_penalty(
    critic: Callable[[Any], Any], real: Any, fake: Any, alpha: Any = None, seed: Any = None
) -> Any:
    """``mean((||d critic(x_hat) / d x_hat|| - 1)^2)`` over a batch, as float32.

    ``x_hat = real + alpha * (fake - real)`` with one ``alpha ~ U[0, 1]`` per example
    (or the given ``alpha``, broadcastable to the batch). The gradient norm is taken
    over all of an example's values. ``critic`` maps a batch to one score per example
    and must not mix examples (no batch normalization).
    """
    real = ops.cast(real, "float32")
    fake = ops.cast(fake, "float32")
    batch = ops.shape(real)[0]
    if alpha is None:
        alpha_shape = (batch,) + (1,) * (len(real.shape) - 1)
        alpha = keras.random.uniform(alpha_shape, seed=seed)
    interpolated = real + ops.cast(alpha, "float32") * (fake - real)
    with tf.GradientTape() as tape:
        tape.watch(interpolated)
        scores = ops.cast(critic(interpolated), "float32")
    grads = tape.gradient(scores, interpolated)
    norms = ops.sqrt(ops.sum(ops.square(ops.reshape(grads, (batch, -1))), axis=1) + 1e-12)
    return ops.mean(ops.square(norms - 1.0))


@keras.saving.register_keras_serializable(package="dlpipe")
class WGANGP(AdversarialModel):
    """A generator and a critic trained with the Wasserstein loss and a gradient penalty.

    :param critic_steps: critic updates per generator update (per batch; every critic
        step sees the same real batch and fresh noise).

    See :class:`dlpipe.models.adversarial.AdversarialModel` for the other parameters; the
    critic is its ``discriminator`` and ``d_optimizer``.
    """

    LOSS_TERMS = ("gp",)
    INITIAL_TERM_WEIGHTS = {"gp": 10.0}

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        critic_steps: int = 5,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("num_classes"):
            raise ValueError("WGANGP is unconditional (num_classes must be 0)")
        super().__init__(generator, discriminator, **kwargs)
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, not {critic_steps}")
        self.critic_steps = int(critic_steps)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.wasserstein_tracker = keras.metrics.Mean(name="wasserstein")
        self.gp_tracker = keras.metrics.Mean(name="gp")

    @property
    def metrics(self) -> list[Any]:
        return [self.d_loss_tracker, self.g_loss_tracker, self.wasserstein_tracker, self.gp_tracker]

    def critic_loss(self, real: Any, training: bool = True) -> tuple[Any, Any, Any]:
        """``(d_loss, wasserstein, gp)``: ``d_loss = -wasserstein + w_gp * gp``."""
        batch = ops.shape(real)[0]
        fake = self.generate(self.sample_latent(batch), training=training)
        wasserstein = ops.mean(self.discriminate(real, training=training)) - ops.mean(
            self.discriminate(fake, training=training)
        )
        gp = gradient_penalty(
            lambda x: self.discriminate(x, training=training), real, fake, seed=self.seed_generator
        )
        return -wasserstein + self.loss_weights["gp"] * gp, wasserstein, gp

    def generator_loss(self, batch: Any, training: bool = True) -> Any:
        fake = self.generate(self.sample_latent(batch), training=training)
        return -ops.mean(self.discriminate(fake, training=training))

    def _track(self, d_loss: Any, g_loss: Any, wasserstein: Any, gp: Any) -> dict[str, Any]:
        for tracker, value in zip(self.metrics, (d_loss, g_loss, wasserstein, gp), strict=True):
            tracker.update_state(value)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, Any]:
        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        critic_vars = self.discriminator.trainable_variables
        # The replica scaling must happen inside the tape, or it is not recorded.
        for _ in range(self.critic_steps):  # unrolled when traced: keep it small
            with tf.GradientTape() as tape:
                d_loss, wasserstein, gp = self.critic_loss(real)
                scaled = replica_scaled(d_loss)
            apply_gradients(self.d_optimizer, tape, scaled, critic_vars)
        with tf.GradientTape() as tape:
            g_loss = self.generator_loss(ops.shape(real)[0])
            scaled = replica_scaled(g_loss)
        apply_gradients(self.optimizer, tape, scaled, self.generator.trainable_variables)
        return self._track(d_loss, g_loss, wasserstein, gp)

    def test_step(self, data: Any) -> dict[str, Any]:
        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        d_loss, wasserstein, gp = self.critic_loss(real, training=False)
        g_loss = self.generator_loss(ops.shape(real)[0], training=False)
        return self._track(d_loss, g_loss, wasserstein, gp)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "critic_steps": self.critic_steps}


def build(params: WGANGPParams, data: DataBundle) -> WGANGP:
    """The registered builder: a built, uncompiled :class:`WGANGP` for ``data``."""
    gan.check_params(params, data, "wgan_gp", conditional=False)
    shape = tuple(data.input_shape)
    filters = list(params.filters)
    generator = gan.build_generator(
        shape,
        params.architecture,
        params.latent_dim,
        filters,
        gan.output_activation(params.output_activation, value_range_of(data)),
        batchnorm=params.batchnorm,
    )
    critic = gan.build_discriminator(shape, params.architecture, filters, 0.0, name="critic")
    model = WGANGP(
        generator,
        critic,
        critic_steps=params.critic_steps,
        d_learning_rate=params.d_learning_rate,
        adam_betas=params.adam_betas,
        sample_every=params.sample_every,
        seed=int(np.random.randint(1, 2**31 - 1)),
        name="wgan_gp",
    )
    model(np.zeros((1, *shape), dtype="float32"))
    return model
