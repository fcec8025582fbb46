"""What the adversarial models share: ``gan``/``cgan``, ``wgan_gp`` and ``srgan``.

Two networks, each trained by its own optimizer. The train stage compiles a model with
ONE optimizer, which trains the generator; the discriminator's (critic's) is created in
``compile`` as a copy of it (:func:`clone_optimizer`), with an optional learning rate
of its own (``d_learning_rate``) and, for Adam, the GAN-friendly betas
(:func:`set_adam_betas`). The train stage compiles inside the distribution strategy's
scope, so both optimizers and their variables are created there. Under
``precision: mixed_float16`` both optimizers scale their loss (:func:`loss_scaled`).

:class:`AdversarialModel` is the base of the GANs in :mod:`dlpipe.models.gan.model`
and :mod:`dlpipe.models.wgan_gp.model`: networks, noise, the second optimizer,
sampling (:meth:`~AdversarialModel.generate`, the deterministic entry point, and
:meth:`~AdversarialModel.generate_samples`, the one evaluation stages such as
``sample_quality`` call on any generative model), fixed-noise grids and saving.
SRGAN (:mod:`dlpipe.models.srgan.model`) is a super-resolution model and uses the
optimizer helpers and :func:`bce_from_logits` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from dlpipe.models.common import make_loss_weights


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


def bce_from_logits(targets: Any, logits: Any) -> Any:
    """Mean binary cross-entropy of float32 logits."""
    return ops.mean(ops.binary_crossentropy(targets, logits, from_logits=True))
