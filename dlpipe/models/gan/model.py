"""DCGAN-style and conditional GANs for the ``gan`` and ``cgan`` architectures.

In the spirit of the keras-io examples ``generative/dcgan_overriding_train_step.py`` and
``generative/conditional_gan.py``: a generator maps noise ``z`` (and, for a
conditional GAN, a class label) to an image; a discriminator scores images (and their
labels) as real or fake. A custom ``train_step`` alternates one discriminator update
and one generator update, each with its own optimizer (see
:mod:`dlpipe.models.adversarial` for the two optimizers, sampling and saving, which
``wgan_gp`` shares).

Discriminator targets can be softened with one-sided label smoothing (real targets
``1 - label_smoothing``) and label noise (each target flipped with probability
``label_noise``); see :func:`discriminator_targets`.

Mixed precision (the spec's ``precision: mixed_float16``): the networks compute in
float16 but their last layers (the image, the logit) are float32, so every loss is
computed in float32.

Two named loss terms, ``discriminator`` and ``generator``, weight the two losses
(``train.loss_weights``); both default to 1. Training reports the unweighted
``d_loss`` (the mean of the real and fake binary cross-entropies), ``g_loss``, and
``real_score``/``fake_score`` (the discriminator's mean probability of "real").

``model(x)`` returns ``len(x)`` generated images (fresh noise; ``x`` only sets the
batch size, and for a conditional GAN may be ``(x, labels)``; otherwise the labels
cycle through the classes). Sample grids from FIXED noise are logged every
``sample_every`` epochs by :func:`callbacks`, and once more after training by
:func:`dlpipe.models.gan.plots.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models import grids
from dlpipe.models.adversarial import AdversarialModel, bce_from_logits
from dlpipe.models.common import apply_gradients, replica_scaled
from dlpipe.models.gan import AdversarialParams, CGANParams, GANBaseParams, GANParams
from dlpipe.models.grids import value_range_of

# --------------------------------------------------------------------------------------
# The GAN
# --------------------------------------------------------------------------------------


def discriminator_targets(
    real: bool, batch: Any, smoothing: float = 0.0, flip_prob: float = 0.0, seed: Any = None
) -> Any:
    """``(batch, 1)`` float32 targets for the discriminator.

    Hard targets are 1 for real images and 0 for fakes. With ``flip_prob`` > 0 each
    target is flipped with that probability (label noise); then one-sided label
    smoothing scales every target labelled "real" to ``1 - smoothing``. The generator
    always trains against hard "real" targets.
    """
    hard = ops.full((batch, 1), 1.0 if real else 0.0, dtype="float32")
    if flip_prob > 0:
        flip = keras.random.uniform((batch, 1), seed=seed) < flip_prob
        hard = ops.where(flip, 1.0 - hard, hard)
    return hard * (1.0 - smoothing) if smoothing > 0 else hard


@keras.saving.register_keras_serializable(package="dlpipe")
class GAN(AdversarialModel):
    """A GAN trained with the non-saturating loss, one D and one G step per batch.

    :param label_smoothing: real targets become ``1 - label_smoothing`` (one-sided).
    :param label_noise: probability of flipping each discriminator target.

    See :class:`AdversarialModel` for the other parameters.
    """

    LOSS_TERMS = ("discriminator", "generator")

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        label_smoothing: float = 0.0,
        label_noise: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(generator, discriminator, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing}")
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], not {label_noise}")
        self.label_smoothing = float(label_smoothing)
        self.label_noise = float(label_noise)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.real_score_tracker = keras.metrics.Mean(name="real_score")
        self.fake_score_tracker = keras.metrics.Mean(name="fake_score")

    @property
    def metrics(self) -> list[Any]:
        # Listed here so Keras resets them at the start of each epoch.
        return [
            self.d_loss_tracker,
            self.g_loss_tracker,
            self.real_score_tracker,
            self.fake_score_tracker,
        ]

    def targets(self, real: bool, batch: Any, training: bool = True) -> Any:
        """Discriminator targets with this model's smoothing and noise (training only)."""
        if not training:
            return discriminator_targets(real, batch)
        return discriminator_targets(
            real, batch, self.label_smoothing, self.label_noise, seed=self.seed_generator
        )

    def discriminator_loss(
        self, real: Any, labels: Any, training: bool = True
    ) -> tuple[Any, Any, Any]:
        """``(d_loss, real_logits, fake_logits)`` for a batch of real images."""
        batch = ops.shape(real)[0]
        fake = self.generate(self.sample_latent(batch), labels, training=training)
        real_logits = self.discriminate(real, labels, training=training)
        fake_logits = self.discriminate(fake, labels, training=training)
        d_loss = 0.5 * (
            bce_from_logits(self.targets(True, batch, training), real_logits)
            + bce_from_logits(self.targets(False, batch, training), fake_logits)
        )
        return d_loss, real_logits, fake_logits

    def generator_loss(self, batch: Any, labels: Any, training: bool = True) -> Any:
        fake = self.generate(self.sample_latent(batch), labels, training=training)
        logits = self.discriminate(fake, labels, training=training)
        return bce_from_logits(ops.ones_like(logits), logits)

    def _unpack(self, data: Any) -> tuple[Any, Any, Any]:
        real, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        batch = ops.shape(real)[0]
        return real, (self._labels(labels) if self.conditional else None), batch

    def _track(self, d_loss: Any, g_loss: Any, real_logits: Any, fake_logits: Any) -> dict:
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        self.real_score_tracker.update_state(ops.mean(ops.sigmoid(real_logits)))
        self.fake_score_tracker.update_state(ops.mean(ops.sigmoid(fake_logits)))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, Any]:
        real, labels, batch = self._unpack(data)
        # The replica scaling must happen inside the tape, or it is not recorded.
        # 1) the discriminator, on real images and on fakes (fake labels = real labels)
        with tf.GradientTape() as tape:
            d_loss, real_logits, fake_logits = self.discriminator_loss(real, labels)
            scaled = replica_scaled(self.loss_weights["discriminator"] * d_loss)
        apply_gradients(self.d_optimizer, tape, scaled, self.discriminator.trainable_variables)
        # 2) the generator, through the updated discriminator, on fresh noise
        with tf.GradientTape() as tape:
            g_loss = self.generator_loss(batch, labels)
            scaled = replica_scaled(self.loss_weights["generator"] * g_loss)
        apply_gradients(self.optimizer, tape, scaled, self.generator.trainable_variables)
        return self._track(d_loss, g_loss, real_logits, fake_logits)

    def test_step(self, data: Any) -> dict[str, Any]:
        real, labels, batch = self._unpack(data)
        d_loss, real_logits, fake_logits = self.discriminator_loss(real, labels, training=False)
        g_loss = self.generator_loss(batch, labels, training=False)
        return self._track(d_loss, g_loss, real_logits, fake_logits)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "label_smoothing": self.label_smoothing,
            "label_noise": self.label_noise,
        }


# --------------------------------------------------------------------------------------
# Networks from the plugin's params
# --------------------------------------------------------------------------------------


def output_activation(name: str, value_range: Sequence[float]) -> str:
    """``auto``: tanh for [-1, 1] data, sigmoid for [0, 1], else linear."""
    if name != "auto":
        return name
    low, high = float(value_range[0]), float(value_range[1])
    if (low, high) == (-1.0, 1.0):
        return "tanh"
    if (low, high) == (0.0, 1.0):
        return "sigmoid"
    return "linear"


def build_generator(
    output_shape: tuple[int, ...],
    kind: str,
    latent_dim: int,
    filters: list[int],
    out_activation: str,
    batchnorm: bool = True,
    num_classes: int = 0,
    label_dim: int = 16,
) -> keras.Model:
    """``z`` (and a label) -> image, with ``out_activation`` on a float32 output.

    ``conv`` (DCGAN): Dense to a ``(h / 2**k, w / 2**k, filters[0])`` map, then one
    stride-2 ``Conv2DTranspose`` per entry of ``filters`` (``k`` = their number), then
    a 3x3 convolution to the image's channels. ``dense``: one Dense layer per entry.
    """
    z = keras.Input(shape=(latent_dim,), name="z")
    inputs: list[Any] = [z]
    h = z
    if num_classes:
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        inputs.append(label)
        embedded = layers.Flatten(name="label_flat")(
            layers.Embedding(num_classes, label_dim, name="label_embedding")(label)
        )
        h = layers.Concatenate(name="z_and_label")([z, embedded])

    def norm_act(h: Any, name: str) -> Any:
        if batchnorm:
            h = layers.BatchNormalization(name=f"{name}_bn")(h)
        return layers.LeakyReLU(0.2, name=f"{name}_act")(h)

    if kind == "conv":
        height, width, channels = output_shape
        factor = 2 ** len(filters)
        start = (height // factor, width // factor, filters[0])
        h = norm_act(
            layers.Dense(math.prod(start), use_bias=not batchnorm, name="project")(h), "project"
        )
        h = layers.Reshape(start, name="reshape")(h)
        for i, f in enumerate(filters):
            h = layers.Conv2DTranspose(
                f, 4, strides=2, padding="same", use_bias=not batchnorm, name=f"up_{i}"
            )(h)
            h = norm_act(h, f"up_{i}")
        image = layers.Conv2D(
            channels, 3, padding="same", activation=out_activation, dtype="float32", name="image"
        )(h)
    else:
        for i, units in enumerate(filters):
            h = norm_act(
                layers.Dense(units, use_bias=not batchnorm, name=f"dense_{i}")(h), f"dense_{i}"
            )
        flat = layers.Dense(
            math.prod(output_shape), activation=out_activation, dtype="float32", name="image_flat"
        )(h)
        image = layers.Reshape(output_shape, dtype="float32", name="image")(flat)
    return keras.Model(inputs if num_classes else z, image, name="generator")


def build_discriminator(
    input_shape: tuple[int, ...],
    kind: str,
    filters: list[int],
    dropout: float = 0.3,
    num_classes: int = 0,
    name: str = "discriminator",
) -> keras.Model:
    """image (and a label) -> one float32 logit (a critic score for WGAN-GP).

    ``conv``: one stride-2 4x4 convolution + LeakyReLU per entry of ``filters``, in
    reverse order (the mirror of the generator), then dropout and a Dense logit. No
    batch normalization (the WGAN-GP penalty is per example). A conditional model
    appends the label, embedded as one extra image channel (``conv``) or a vector.
    """
    image = keras.Input(shape=input_shape, name="image")
    inputs: list[Any] = [image]
    h = image
    label = None
    if num_classes:
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        inputs.append(label)
    if kind == "conv":
        height, width = input_shape[:2]
        if label is not None:
            plane = layers.Embedding(num_classes, height * width, name="label_embedding")(label)
            plane = layers.Reshape((height, width, 1), name="label_plane")(plane)
            h = layers.Concatenate(name="image_and_label")([image, plane])
        for i, f in enumerate(reversed(filters)):
            h = layers.Conv2D(f, 4, strides=2, padding="same", name=f"down_{i}")(h)
            h = layers.LeakyReLU(0.2, name=f"down_{i}_act")(h)
        h = layers.Flatten(name="flatten")(h)
    else:
        h = layers.Flatten(name="flatten")(h)
        if label is not None:
            embedded = layers.Flatten(name="label_flat")(
                layers.Embedding(num_classes, 16, name="label_embedding")(label)
            )
            h = layers.Concatenate(name="image_and_label")([h, embedded])
        for i, units in enumerate(reversed(filters)):
            h = layers.LeakyReLU(0.2, name=f"dense_{i}_act")(
                layers.Dense(units, name=f"dense_{i}")(h)
            )
    if dropout > 0:
        h = layers.Dropout(dropout, name="dropout")(h)
    logit = layers.Dense(1, dtype="float32", name="logit")(h)
    return keras.Model(inputs if num_classes else image, logit, name=name)


def check_params(params: AdversarialParams, data: DataBundle, arch: str, conditional: bool) -> None:
    """Clear errors for settings the data cannot support."""
    if not params.filters:
        raise ConfigError(f"{arch}: 'filters' must list at least one width / filter count")
    shape = tuple(data.input_shape)
    if params.architecture == "conv":
        if len(shape) != 3:
            raise ConfigError(
                f"{arch}: architecture 'conv' needs images (height, width, channels), got "
                f"input shape {shape}; use architecture 'dense'"
            )
        factor = 2 ** len(params.filters)
        if shape[0] % factor or shape[1] % factor:
            raise ConfigError(
                f"{arch}: {len(params.filters)} stride-2 blocks need height and width "
                f"divisible by {factor}, got {shape[:2]}; use fewer 'filters' or resize the "
                "images (data param image_size, e.g. [16, 16])"
            )
    if conditional and not data.num_classes:
        raise ConfigError(
            f"{arch}: a conditional GAN needs class labels; the data has no num_classes"
        )


def _build(params: GANBaseParams, data: DataBundle, conditional: bool, arch: str) -> GAN:
    check_params(params, data, arch, conditional)
    shape = tuple(data.input_shape)
    num_classes = int(data.num_classes or 0) if conditional else 0
    filters = list(params.filters)
    generator = build_generator(
        shape,
        params.architecture,
        params.latent_dim,
        filters,
        output_activation(params.output_activation, value_range_of(data)),
        batchnorm=params.batchnorm,
        num_classes=num_classes,
    )
    discriminator = build_discriminator(
        shape, params.architecture, filters, params.dropout, num_classes
    )
    model = GAN(
        generator,
        discriminator,
        label_smoothing=params.label_smoothing,
        label_noise=params.label_noise,
        num_classes=num_classes,
        d_learning_rate=params.d_learning_rate,
        adam_betas=params.adam_betas,
        sample_every=params.sample_every,
        seed=int(np.random.randint(1, 2**31 - 1)),
        name=arch,
    )
    model(np.zeros((1, *shape), dtype="float32"))
    return model


def build(params: GANParams, data: DataBundle) -> GAN:
    """The ``gan`` builder (conditional when ``params.conditional``)."""
    conditional = bool(getattr(params, "conditional", False))
    return _build(params, data, conditional, "cgan" if conditional else "gan")


def build_conditional(params: CGANParams, data: DataBundle) -> GAN:
    """The ``cgan`` builder: a conditional GAN on the data's class labels."""
    return _build(params, data, True, "cgan")


# --------------------------------------------------------------------------------------
# Sample grids during training (the figures after it are in dlpipe.models.gan.plots)
# --------------------------------------------------------------------------------------


def callbacks(context: Any, model: AdversarialModel, data: DataBundle) -> list[Any]:
    """The registered callback hook: a fixed-noise sample grid every ``sample_every``
    epochs, one row per class for a conditional model (image data only)."""
    if not data.is_image or model.sample_every <= 0:
        return []
    names = list(data.class_names or [])
    return [
        grids.sample_grid_callback(
            context,
            model.sample_every,
            lambda: grids.named_rows(model.sample_grid(), names),
            value_range_of(data),
        )
    ]
