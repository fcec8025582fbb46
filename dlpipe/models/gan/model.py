"""DCGAN-style and conditional GANs for the ``gan`` and ``cgan`` architectures.

In the spirit of the keras-io examples ``generative/dcgan_overriding_train_step.py`` and
``generative/conditional_gan.py``: a generator maps noise ``z`` (and, for a
conditional GAN, a class label) to an image; a discriminator scores images (and their
labels) as real or fake. A custom ``train_step`` alternates one discriminator update
and one generator update, each with its own optimizer:

* the generator uses the optimizer the train stage compiles the model with;
* the discriminator's optimizer (``d_optimizer``) is created in :meth:`compile` as a
  copy of it, with an optional learning rate of its own (``d_learning_rate``). The
  train stage compiles inside the distribution strategy's scope, so both optimizers
  (and their variables) are created there.

Discriminator targets can be softened with one-sided label smoothing (real targets
``1 - label_smoothing``) and label noise (each target flipped with probability
``label_noise``); see :func:`discriminator_targets`.

Mixed precision (the spec's ``precision: mixed_float16``): the networks compute in
float16 but their last layers (the image, the logit) are float32, so every loss is
computed in float32; both optimizers scale their loss (see :meth:`compile`).

Two named loss terms, ``discriminator`` and ``generator``, weight the two losses
(``train.loss_weights``); both default to 1. Training reports the unweighted
``d_loss`` (the mean of the real and fake binary cross-entropies), ``g_loss``, and
``real_score``/``fake_score`` (the discriminator's mean probability of "real").

``model(x)`` returns ``len(x)`` generated images (fresh noise; ``x`` only sets the
batch size, and for a conditional GAN may be ``(x, labels)``; otherwise the labels
cycle through the classes). :meth:`AdversarialModel.generate` is the deterministic
entry point, and :meth:`AdversarialModel.generate_samples` (``n`` images as NumPy,
seeded, balanced labels when conditional) the uniform one that evaluation stages
such as ``sample_quality`` use on any generative model. Sample grids from FIXED
noise are logged every ``sample_every`` epochs by :func:`callbacks`, and once more by
:func:`plots` after training.

:class:`AdversarialModel` holds what GANs share (networks, noise, the second
optimizer, sampling, saving); :mod:`dlpipe.models.wgan_gp.model` builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.models import grids
from dlpipe.models.common import apply_gradients, make_loss_weights, replica_scaled

# --------------------------------------------------------------------------------------
# What every adversarial model shares
# --------------------------------------------------------------------------------------


def clone_optimizer(optimizer: Any, learning_rate: float | None = None) -> Any:
    """A fresh optimizer configured like ``optimizer`` (no shared state).

    ``learning_rate`` replaces the rate. A ``LossScaleOptimizer`` (mixed precision)
    is unwrapped, cloned and wrapped again. A learning-rate schedule is rebuilt from its
    config (public serialization), so a custom schedule must be registered
    serializable, as dlpipe's ``WarmUp`` is.
    """
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    inner = optimizer.inner_optimizer if scaled else optimizer
    config = inner.get_config()
    if learning_rate is not None:
        config["learning_rate"] = float(learning_rate)
    elif isinstance(config.get("learning_rate"), dict):
        # A schedule, serialized by get_config: rebuild it through the public API.
        config["learning_rate"] = keras.optimizers.schedules.deserialize(config["learning_rate"])
    config["name"] = f"d_{config.get('name') or 'optimizer'}"
    clone = type(inner).from_config(config)
    return keras.optimizers.LossScaleOptimizer(clone) if scaled else clone


def set_adam_betas(optimizer: Any, betas: Sequence[float]) -> None:
    """Set ``beta_1``/``beta_2`` of an Adam-family optimizer (others are left alone).

    Must happen before the first training step (the values are read when traced).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(inner, "beta_1") and hasattr(inner, "beta_2"):
        inner.beta_1, inner.beta_2 = float(betas[0]), float(betas[1])


def loss_scaled(optimizer: Any, policy: Any) -> Any:
    """``optimizer`` wrapped in a ``LossScaleOptimizer`` under a ``mixed_float16`` policy.

    Keras wraps the optimizer given to ``compile`` itself; the second optimizer of an
    adversarial model needs the same treatment, or its float16 gradients underflow.
    """
    wrapped = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if getattr(policy, "name", policy) == "mixed_float16" and not wrapped:
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class AdversarialModel(keras.Model):
    """A generator and a discriminator (or critic) with an optimizer each.

    Subclasses set :attr:`LOSS_TERMS` / :attr:`INITIAL_TERM_WEIGHTS` and write
    ``train_step``/``test_step``. Compile with ONE optimizer (the generator's);
    :meth:`compile` derives the discriminator's.

    :param generator: ``z -> image``, or ``[z, label] -> image`` when conditional.
    :param discriminator: ``image -> logit``, or ``[image, label] -> logit``.
    :param num_classes: 0 for an unconditional model, else the number of classes.
    :param d_learning_rate: the discriminator's rate; ``None`` copies the generator's.
    :param adam_betas: ``(beta_1, beta_2)`` given to both optimizers when they are
        Adam-family (GANs want ``beta_1 = 0.5``, Radford et al.); ``None`` keeps the
        compiled optimizer's.
    :param sample_every: log a fixed-noise sample grid every this many epochs (0: never).
    :param seed: seed of the training noise and of the fixed grid noise.
    """

    LOSS_TERMS: tuple[str, ...] = ()
    INITIAL_TERM_WEIGHTS: dict[str, float] = {}

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        num_classes: int = 0,
        d_learning_rate: float | None = None,
        adam_betas: Sequence[float] | None = None,
        sample_every: int = 5,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.num_classes = int(num_classes)
        self.conditional = self.num_classes > 0
        self.d_learning_rate = d_learning_rate
        self.adam_betas = None if adam_betas is None else [float(b) for b in adam_betas]
        self.sample_every = int(sample_every)
        self.seed = seed
        self.latent_dim = int(generator.inputs[0].shape[-1])
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_weights = make_loss_weights(self.LOSS_TERMS, self.INITIAL_TERM_WEIGHTS)
        self.d_optimizer: Any = None

    # --- optimizers ----------------------------------------------------------------

    def compile(self, optimizer: Any = "adam", d_optimizer: Any = None, **kwargs: Any) -> None:
        """``optimizer`` trains the generator; ``d_optimizer`` (default: a copy of
        ``optimizer`` with ``d_learning_rate``) trains the discriminator.

        Call it inside the strategy scope: the discriminator's optimizer variables
        are created here. Under a ``mixed_float16`` policy both optimizers are
        ``LossScaleOptimizer``s (Keras wraps ``optimizer``; :func:`loss_scaled` wraps
        ``d_optimizer``), and :func:`~dlpipe.models.common.apply_gradients` scales
        each loss with its own optimizer's scale.
        """
        super().compile(optimizer=optimizer, **kwargs)
        if self.adam_betas is not None:
            set_adam_betas(self.optimizer, self.adam_betas)
        if d_optimizer is None:
            d_optimizer = clone_optimizer(self.optimizer, self.d_learning_rate)
        else:
            d_optimizer = keras.optimizers.get(d_optimizer)
        self.d_optimizer = loss_scaled(d_optimizer, self.dtype_policy)
        # Each optimizer owns the slots of its own network only; built here (inside
        # the strategy scope) so that fit does not build them, and so that a loaded
        # model's optimizers match the saved ones variable for variable.
        self.optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras skips compile() on load when it is overridden; this restores both
        # optimizers so their saved state can be loaded into them.
        self.compile(**keras.saving.deserialize_keras_object(config))

    # --- the networks ----------------------------------------------------------------

    def sample_latent(self, batch: Any) -> Any:
        """``batch`` latent vectors from ``N(0, I)`` (advances the seed generator)."""
        return keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)

    def _labels(self, labels: Any) -> Any:
        """``(batch, 1)`` int32 labels; one-hot labels are decoded."""
        if labels is None:
            raise ValueError(f"{self.name}: a conditional model needs class labels")
        if len(labels.shape) > 1 and labels.shape[-1] not in (None, 1):
            labels = ops.argmax(labels, axis=-1)
        return ops.reshape(ops.cast(labels, "int32"), (-1, 1))

    def generate(self, z: Any, labels: Any = None, training: bool | None = False) -> Any:
        """Images from latent vectors ``z`` (and labels, when conditional)."""
        z = ops.convert_to_tensor(z)
        if self.conditional:
            labels = self._labels(labels)
            return self.generator([z, labels], training=training)
        return self.generator(z, training=training)

    def discriminate(self, images: Any, labels: Any = None, training: bool | None = False) -> Any:
        """The discriminator's (critic's) float32 scores of ``images``, shape ``(n, 1)``."""
        images = ops.convert_to_tensor(images)
        if self.conditional:
            labels = self._labels(labels)
            out = self.discriminator([images, labels], training=training)
        else:
            out = self.discriminator(images, training=training)
        return ops.cast(out, "float32")

    def build(self, input_shape: Any = None) -> None:
        # Generator and discriminator are built functional models.
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        labels = None
        if isinstance(inputs, (tuple, list)):
            inputs, labels = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        batch = ops.shape(inputs)[0]
        if self.conditional and labels is None:
            labels = ops.mod(ops.arange(batch, dtype="int32"), self.num_classes)
        return self.generate(self.sample_latent(batch), labels, training=training)

    # --- fixed-noise samples ---------------------------------------------------------

    def fixed_latent(self, n: int) -> np.ndarray:
        """The same ``n`` latent vectors every time (seeded by the model's seed)."""
        rng = np.random.default_rng(self.seed or 0)
        return rng.standard_normal((n, self.latent_dim)).astype("float32")

    def sample_grid(self, cols: int = 8) -> tuple[np.ndarray, int, list[str] | None]:
        """Fixed-noise samples for a grid: ``(images, cols, row_labels)``.

        Unconditional: ``cols x cols`` samples. Conditional: one row per class (up to
        10), the same noise along each column, so a column shares its "style".
        """
        if not self.conditional:
            z = self.fixed_latent(cols * cols)
            return ops.convert_to_numpy(self.generate(z, training=False)), cols, None
        classes = min(self.num_classes, 10)
        z = np.tile(self.fixed_latent(cols), (classes, 1))
        labels = np.repeat(np.arange(classes, dtype="int32"), cols)
        images = ops.convert_to_numpy(self.generate(z, labels, training=False))
        return images, cols, [str(c) for c in range(classes)]

    def generate_samples(
        self, n: int, labels: Any = None, seed: int | None = 0, batch_size: int = 256
    ) -> np.ndarray:
        """``n`` generated images as a float32 NumPy array, in the data's value range.

        The uniform sampling method that evaluation stages (``sample_quality``) call
        on every generative model. The noise comes from ``np.random.default_rng(seed)``
        (the same seed, the same samples; ``None``: fresh noise). A conditional model uses ``labels``
        (``n`` class ids) or, when they are not given, balanced labels
        ``0, 1, ..., K-1, 0, 1, ...``; an unconditional model refuses labels.
        """
        n = int(n)
        if self.conditional:
            if labels is None:
                labels = np.arange(n) % self.num_classes
            labels = np.asarray(labels).reshape(-1).astype("int32")
            if len(labels) != n:
                raise ValueError(f"{self.name}: {len(labels)} labels for {n} samples")
        elif labels is not None:
            raise ValueError(f"{self.name} is unconditional: it cannot generate by label")
        z = np.random.default_rng(seed).standard_normal((n, self.latent_dim)).astype("float32")
        chunks = []
        for start in range(0, n, batch_size):
            part = None if labels is None else labels[start : start + batch_size]
            images = self.generate(z[start : start + batch_size], part, training=False)
            chunks.append(ops.convert_to_numpy(ops.cast(images, "float32")))
        if not chunks:
            return np.zeros((0, *self.generator.output.shape[1:]), dtype="float32")
        return np.concatenate(chunks, axis=0)

    # --- serialization ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "generator": keras.saving.serialize_keras_object(self.generator),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "num_classes": self.num_classes,
            "d_learning_rate": self.d_learning_rate,
            "adam_betas": self.adam_betas,
            "sample_every": self.sample_every,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        generator = keras.saving.deserialize_keras_object(config.pop("generator"))
        discriminator = keras.saving.deserialize_keras_object(config.pop("discriminator"))
        return cls(generator, discriminator, **config)


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


def bce_from_logits(targets: Any, logits: Any) -> Any:
    """Mean binary cross-entropy of float32 logits."""
    return ops.mean(ops.binary_crossentropy(targets, logits, from_logits=True))


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


def check_params(params: Any, data: Any, arch: str, conditional: bool) -> None:
    """Clear errors for settings the data cannot support."""
    if not params.filters:
        raise ValueError(f"{arch}: 'filters' must list at least one width / filter count")
    shape = tuple(data.input_shape)
    if params.architecture == "conv":
        if len(shape) != 3:
            raise ValueError(
                f"{arch}: architecture 'conv' needs images (height, width, channels), got "
                f"input shape {shape}; use architecture 'dense'"
            )
        factor = 2 ** len(params.filters)
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(
                f"{arch}: {len(params.filters)} stride-2 blocks need height and width "
                f"divisible by {factor}, got {shape[:2]}; use fewer 'filters' or resize the "
                "images (data param image_size, e.g. [16, 16])"
            )
    if conditional and not data.num_classes:
        raise ValueError(
            f"{arch}: a conditional GAN needs class labels; the data has no num_classes"
        )


def value_range_of(data: Any) -> tuple[float, float]:
    low, high = getattr(data, "value_range", (0.0, 1.0))
    return float(low), float(high)


def _build(params: Any, data: Any, conditional: bool, arch: str) -> GAN:
    check_params(params, data, arch, conditional)
    shape = tuple(data.input_shape)
    num_classes = int(data.num_classes) if conditional else 0
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


def build(params: Any, data: Any) -> GAN:
    """The ``gan`` builder (conditional when ``params.conditional``)."""
    conditional = bool(getattr(params, "conditional", False))
    return _build(params, data, conditional, "cgan" if conditional else "gan")


def build_conditional(params: Any, data: Any) -> GAN:
    """The ``cgan`` builder: a conditional GAN on the data's class labels."""
    return _build(params, data, True, "cgan")


# --------------------------------------------------------------------------------------
# Sample grids: during training (callback) and after it (plots)
# --------------------------------------------------------------------------------------


def sample_grid_figure(
    model: AdversarialModel,
    value_range: Sequence[float],
    title: str,
    class_names: Sequence[str] | None = None,
) -> Any:
    images, cols, rows = model.sample_grid()
    if rows is not None and class_names:
        rows = [str(class_names[int(r)]) for r in rows]
    return grids.grid_figure(images, value_range, cols, title=title, row_labels=rows)


class SampleGrid(keras.callbacks.Callback):
    """Logs a fixed-noise sample grid to ``context`` every ``every`` epochs, as
    ``samples/samples_epoch_NNN.png`` (NNN counts epochs from 1)."""

    def __init__(
        self,
        context: Any,
        every: int,
        value_range: Sequence[float],
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.every = int(every)
        self.value_range = tuple(value_range)
        self.class_names = list(class_names or [])

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        done = epoch + 1
        if self.every > 0 and done % self.every == 0:
            fig = sample_grid_figure(
                self.model, self.value_range, f"epoch {done}", self.class_names
            )
            self.context.log_figure(fig, f"samples_epoch_{done:03d}.png", "samples")


def callbacks(context: Any, model: AdversarialModel, data: Any) -> list[Any]:
    """The registered callback hook: a :class:`SampleGrid` for image data."""
    if not data.is_image or model.sample_every <= 0:
        return []
    return [SampleGrid(context, model.sample_every, value_range_of(data), data.class_names)]


def plot_scores(model: AdversarialModel, data: Any, split: str, what: str) -> Any:
    """Histogram of the discriminator's (critic's) scores of real and generated data."""
    n = min(data.size(split), 1000)
    x = np.asarray(data.x[split][:n], dtype="float32")
    labels = grids.labels_of(data, split) if model.conditional else None
    labels = labels[:n] if labels is not None else None
    z = model.fixed_latent(n)
    fake = ops.convert_to_numpy(model.generate(z, labels, training=False))
    real_scores = ops.convert_to_numpy(model.discriminate(x, labels)).ravel()
    fake_scores = ops.convert_to_numpy(model.discriminate(fake, labels)).ravel()
    if what == "probability":
        real_scores = 1.0 / (1.0 + np.exp(-real_scores))
        fake_scores = 1.0 / (1.0 + np.exp(-fake_scores))
    fig = grids.figure(6, 4)
    ax = fig.subplots()
    bins = np.linspace(
        min(real_scores.min(), fake_scores.min()), max(real_scores.max(), fake_scores.max()), 40
    )
    ax.hist(real_scores, bins=bins, alpha=0.6, label=f"real ({split})")
    ax.hist(fake_scores, bins=bins, alpha=0.6, label="generated")
    ax.set_xlabel(f"discriminator {what}" if what == "probability" else "critic score")
    ax.set_ylabel("count")
    ax.legend()
    return fig


def plots(context: Any, model: AdversarialModel, data: Any) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``samples.png`` (the final fixed-noise grid, one row
    per class for a conditional GAN; image data only) and ``scores.png``."""
    if data.is_image:
        title = "samples by class" if model.conditional else "samples (fixed noise)"
        yield (
            "samples.png",
            sample_grid_figure(model, value_range_of(data), title, data.class_names),
        )
    yield (
        "scores.png",
        plot_scores(
            model,
            data,
            grids.first_split(data),
            "probability" if isinstance(model, GAN) else "score",
        ),
    )
