"""A variational autoencoder (Kingma & Welling, 2014) for the ``vae`` architecture.

In the spirit of the keras-io example ``examples/generative/vae.py``: an encoder maps
an input to the mean and log-variance of a Gaussian over the latent space, a
:class:`Sampling` layer draws ``z`` with the reparameterization trick, and a decoder
maps ``z`` back to input space. The loss is a weighted sum of two named terms,

* ``reconstruction``: binary cross-entropy (``bce``) or squared error (``mse``),
  summed over the pixels of an image and averaged over the batch;
* ``kl``: the KL divergence of the latent Gaussian from the unit Gaussian, summed
  over the latent dimensions and averaged over the batch;

whose weights are the variables in ``VAE.loss_weights`` (a ``kl`` weight other than 1
gives a beta-VAE, Higgins et al. 2017). Training reports ``loss``,
``reconstruction_loss`` and ``kl_loss``.

KL warm-up (Bowman et al., 2016; Sønderby et al., 2016): with ``kl_warmup_epochs = N``
the :class:`KLWarmUp` callback raises the ``kl`` weight linearly from 0 to its
configured value over the first ``N`` epochs, so the decoder learns to use ``z``
before the KL term pulls the posterior to the prior. The configured value (the train
stage's ``loss_weights.kl``, which the tune stage may search) stays the target; the
weight in use is reported each epoch as ``kl_weight``.

The figures are in :mod:`dlpipe.models.vae.plots`.

The conditional VAE in :mod:`dlpipe.models.cvae.model` subclasses :class:`VAE`; that is why
:meth:`VAE.encode`, :meth:`VAE.decode` and :meth:`VAE.generate_samples` take
``labels`` (ignored here).
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
from dlpipe.models.common import apply_gradients, encoder_trunk, make_loss_weights, replica_scaled
from dlpipe.models.grids import value_range_of
from dlpipe.models.vae import VAEParams

LOSS_TERMS = ("reconstruction", "kl")


@keras.saving.register_keras_serializable(package="dlpipe")
class Sampling(layers.Layer):
    """Draws ``z = mean + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)``.

    Called on ``(z_mean, z_log_var)``. The noise is the only random part, so gradients
    flow to both inputs.
    """

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any) -> Any:
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), dtype=z_mean.dtype, seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


def kl_divergence(z_mean: Any, z_log_var: Any) -> Any:
    """``KL(N(mean, exp(log_var)) || N(0, I))`` per example and latent dimension."""
    return -0.5 * (1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))


@keras.saving.register_keras_serializable(package="dlpipe")
class VAE(keras.Model):
    """An encoder, a sampler and a decoder, trained on the negative ELBO.

    :param encoder: a model mapping inputs to ``(z_mean, z_log_var)``.
    :param decoder: a model mapping ``z`` to a reconstruction shaped like the input
        (probabilities in ``[0, 1]`` for ``bce``).
    :param reconstruction: ``bce`` or ``mse``.
    :param seed: seed of the sampler's noise; ``None`` draws one (from Python's
        ``random``, which ``keras.utils.set_random_seed`` seeds).
    :param value_range: the data's value range; :meth:`generate_samples` clips to it.
    :param kl_warmup_epochs: epochs over which :class:`KLWarmUp` (from
        :func:`callbacks`) raises the ``kl`` weight from 0 to its set value; 0: off.
        When on, training also reports the weight in use as ``kl_weight``.
    :param sample_every: :func:`callbacks` logs a sample grid every this many epochs
        (0: never).

    ``model(x)`` decodes the latent mean (deterministic); ``model(x, training=True)``
    decodes a sample. Compile with an optimizer only: the loss is built in.
    """

    #: Whether the networks take a class label (the conditional VAE's are).
    conditional = False

    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        reconstruction: str = "bce",
        seed: int | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        kl_warmup_epochs: int = 0,
        sample_every: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reconstruction not in ("bce", "mse"):
            raise ValueError(f"reconstruction must be 'bce' or 'mse', not {reconstruction!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction = reconstruction
        self.seed = seed
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.kl_warmup_epochs = int(kl_warmup_epochs)
        self.sample_every = int(sample_every)
        self.sampler = Sampling(seed=seed, name="sampling")
        self.latent_dim = int(decoder.inputs[0].shape[-1])
        self.loss_weights = make_loss_weights(LOSS_TERMS)
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    # --- the network --------------------------------------------------------------

    def encode(self, x: Any, labels: Any = None, training: bool | None = None) -> tuple[Any, Any]:
        """``(z_mean, z_log_var)`` of a batch (``labels`` are ignored: unconditional)."""
        z_mean, z_log_var = self.encoder(x, training=training)
        return z_mean, z_log_var

    def decode(self, z: Any, labels: Any = None, training: bool | None = None) -> Any:
        """The reconstructions of a batch of latent vectors (``labels`` ignored)."""
        return self.decoder(z, training=training)

    def sample(self, n: int, seed: Any = None) -> Any:
        """Decode ``n`` latent vectors drawn from the prior ``N(0, I)``.

        ``seed`` is passed to ``keras.random.normal``; by default the sampler's seed
        generator is used (and advanced).
        """
        seed = self.sampler.seed_generator if seed is None else seed
        z = keras.random.normal((n, self.latent_dim), seed=seed)
        return self.decode(z, training=False)

    def generate_samples(
        self, n: int, labels: np.ndarray | None = None, seed: int | None = 0
    ) -> np.ndarray:
        """``n`` images decoded from prior samples, as float32 NumPy in the data's
        value range (the sampling method every generative model here offers).

        The latents come from ``np.random.default_rng(seed)``, so a seed always gives
        the same images (``None``: fresh ones). ``labels`` are ignored by the
        unconditional VAE; the conditional one samples each image as its label.
        """
        z = np.random.default_rng(seed).standard_normal((int(n), self.latent_dim))
        images = decode_batches(self, z.astype("float32"), self.class_labels(n, labels))
        return np.clip(images, *self.value_range).astype("float32")

    def class_labels(self, n: int, labels: Any) -> np.ndarray | None:
        """The labels to sample ``n`` images with; ``None`` for an unconditional model."""
        return None

    def sample_grid(self, class_names: Sequence[str] = (), cols: int = 8) -> grids.SampleSet:
        """A fixed-seed grid of :meth:`generate_samples`, ``cols x cols`` (the
        conditional VAE gives one row per class)."""
        return self.generate_samples(cols * cols, seed=0), cols, None

    def build(self, input_shape: Any = None) -> None:
        # The encoder and decoder are built functional models; only the sampler is
        # not (it is skipped at inference) and it has no weights.
        latent = (None, self.latent_dim)
        self.sampler.build((latent, latent))
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        z_mean, z_log_var = self.encode(inputs, training=training)
        z = self.sampler((z_mean, z_log_var)) if training else z_mean
        return self.decode(z, training=training)

    # --- the loss -----------------------------------------------------------------

    def loss_terms(
        self, x: Any, labels: Any = None, training: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """The weighted total loss of a batch and its unweighted terms (float32)."""
        z_mean, z_log_var = self.encode(x, labels, training=training)
        z = self.sampler((z_mean, z_log_var))
        x_hat = ops.cast(self.decode(z, labels, training=training), "float32")
        x = ops.cast(x, "float32")
        z_mean = ops.cast(z_mean, "float32")
        z_log_var = ops.cast(z_log_var, "float32")

        if self.reconstruction == "bce":
            per_value = ops.binary_crossentropy(x, x_hat)
        else:
            per_value = ops.square(x - x_hat)
        per_example = ops.sum(ops.reshape(per_value, (ops.shape(x)[0], -1)), axis=1)
        kl = ops.sum(kl_divergence(z_mean, z_log_var), axis=1)
        terms = {"reconstruction": ops.mean(per_example), "kl": ops.mean(kl)}
        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        return total, terms

    @property
    def metrics(self) -> list[Any]:
        # Listed here so Keras resets them at the start of each epoch.
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def _track(self, total: Any, terms: dict[str, Any]) -> dict[str, Any]:
        self.total_loss_tracker.update_state(total)
        self.reconstruction_loss_tracker.update_state(terms["reconstruction"])
        self.kl_loss_tracker.update_state(terms["kl"])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, Any]:
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            total, terms = self.loss_terms(x, labels, training=True)
            scaled = replica_scaled(total)
        apply_gradients(self.optimizer, tape, scaled, self.trainable_variables)
        logs = self._track(total, terms)
        if self.kl_warmup_epochs > 0:
            # Constant within an epoch (KLWarmUp assigns it between epochs).
            logs["kl_weight"] = ops.convert_to_tensor(self.loss_weights["kl"])
        return logs

    def test_step(self, data: Any) -> dict[str, Any]:
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        total, terms = self.loss_terms(x, labels, training=False)
        return self._track(total, terms)

    # --- serialization ------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "reconstruction": self.reconstruction,
            "seed": self.seed,
            "value_range": list(self.value_range),
            "kl_warmup_epochs": self.kl_warmup_epochs,
            "sample_every": self.sample_every,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VAE:
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


# --------------------------------------------------------------------------------------
# Encoder and decoder from the plugin's params
# --------------------------------------------------------------------------------------


def label_planes(label: Any, height: int, width: int) -> Any:
    """A one-hot ``(batch, classes)`` label as ``classes`` constant image planes."""
    classes = int(label.shape[-1])
    planes = layers.Reshape((1, 1, classes), name="label_pixel")(label)
    return layers.UpSampling2D((height, width), name="label_planes")(planes)


def build_encoder(
    input_shape: tuple[int, ...],
    kind: str,
    hidden: list[int],
    latent_dim: int,
    activation: str,
    num_classes: int = 0,
) -> keras.Model:
    """``x -> (z_mean, z_log_var)``: Dense layers, or stride-2 Conv2D blocks.

    With ``num_classes > 0`` the encoder is conditional, ``[x, one_hot_label] ->
    (z_mean, z_log_var)``: the label is concatenated to the flattened input (dense) or
    to the image as constant planes, one per class (conv).
    """
    x = keras.Input(shape=input_shape, name="x")
    inputs: Any = x
    h = x
    if num_classes:
        label = keras.Input(shape=(num_classes,), name="label")
        inputs = [x, label]
        if kind == "conv":
            h = layers.Concatenate(name="x_and_label")([x, label_planes(label, *input_shape[:2])])
        else:
            h = layers.Concatenate(name="x_and_label")([layers.Flatten(name="x_flat")(x), label])
    h = encoder_trunk(h, kind, hidden, activation)
    # float32 heads: exp(z_log_var) must not overflow under mixed precision.
    z_mean = layers.Dense(latent_dim, dtype="float32", name="z_mean")(h)
    z_log_var = layers.Dense(latent_dim, dtype="float32", name="z_log_var")(h)
    return keras.Model(inputs, [z_mean, z_log_var], name="encoder")


def build_decoder(
    output_shape: tuple[int, ...],
    kind: str,
    hidden: list[int],
    latent_dim: int,
    activation: str,
    output_activation: str,
    num_classes: int = 0,
) -> keras.Model:
    """``z -> x_hat``, the mirror image of :func:`build_encoder`.

    With ``num_classes > 0``: ``[z, one_hot_label] -> x_hat``, the label
    concatenated to ``z``.
    """
    z = keras.Input(shape=(latent_dim,), name="z")
    inputs: Any = z
    h = z
    if num_classes:
        label = keras.Input(shape=(num_classes,), name="label")
        inputs = [z, label]
        h = layers.Concatenate(name="z_and_label")([z, label])
    if kind == "conv":
        height, width, channels = output_shape
        factor = 2 ** len(hidden)
        start = (height // factor, width // factor, hidden[-1])
        h = layers.Dense(math.prod(start), activation=activation, name="dense")(h)
        h = layers.Reshape(start, name="reshape")(h)
        for i, filters in enumerate(reversed(hidden)):
            h = layers.Conv2DTranspose(
                filters, 3, strides=2, padding="same", activation=activation, name=f"deconv_{i}"
            )(h)
        x_hat = layers.Conv2D(
            channels,
            3,
            padding="same",
            activation=output_activation,
            dtype="float32",
            name="x_hat",
        )(h)
    else:
        for i, units in enumerate(reversed(hidden)):
            h = layers.Dense(units, activation=activation, name=f"dense_{i}")(h)
        h = layers.Dense(
            math.prod(output_shape), activation=output_activation, dtype="float32", name="x_hat"
        )(h)
        x_hat = layers.Reshape(output_shape, dtype="float32", name="reshape")(h)
    return keras.Model(inputs, x_hat, name="decoder")


def check_params(
    params: VAEParams, input_shape: tuple[int, ...], value_range: Sequence[float], arch: str = "vae"
) -> None:
    """Clear errors for settings the data cannot support."""
    if not params.hidden:
        raise ConfigError(f"{arch}: 'hidden' must list at least one layer width / filter count")
    if params.encoder == "conv":
        if len(input_shape) != 3:
            raise ConfigError(
                f"{arch}: encoder 'conv' needs images (height, width, channels), "
                f"got input shape {input_shape}; use encoder 'dense'"
            )
        factor = 2 ** len(params.hidden)
        if input_shape[0] % factor or input_shape[1] % factor:
            raise ConfigError(
                f"{arch}: {len(params.hidden)} stride-2 conv blocks need height and width "
                f"divisible by {factor}, got {input_shape[:2]}; use fewer 'hidden' entries"
            )
    low, high = value_range
    if params.reconstruction == "bce" and (low < 0 or high > 1):
        raise ConfigError(
            f"{arch}: reconstruction 'bce' needs inputs in [0, 1], the data's value range "
            f"is {tuple(value_range)}; rescale the data or use reconstruction 'mse'"
        )


def networks(
    params: VAEParams, data: DataBundle, num_classes: int = 0
) -> tuple[keras.Model, keras.Model]:
    """The encoder and decoder for ``data``'s inputs (conditional when ``num_classes``)."""
    input_shape = tuple(data.input_shape)
    out_activation = "sigmoid" if params.reconstruction == "bce" else "linear"
    hidden = list(params.hidden)
    encoder = build_encoder(
        input_shape, params.encoder, hidden, params.latent_dim, params.activation, num_classes
    )
    decoder = build_decoder(
        input_shape,
        params.encoder,
        hidden,
        params.latent_dim,
        params.activation,
        out_activation,
        num_classes,
    )
    return encoder, decoder


def build(params: VAEParams, data: DataBundle) -> VAE:
    """The registered builder: a built, uncompiled :class:`VAE` for ``data``'s inputs.

    The sampler's seed is drawn from NumPy's global generator, so a build after
    ``keras.utils.set_random_seed(s)`` is reproducible (and the seed is saved).
    """
    input_shape = tuple(data.input_shape)
    check_params(params, input_shape, value_range_of(data))
    encoder, decoder = networks(params, data)
    seed = int(np.random.randint(1, 2**31 - 1))
    model = VAE(
        encoder,
        decoder,
        reconstruction=params.reconstruction,
        seed=seed,
        value_range=value_range_of(data),
        kl_warmup_epochs=getattr(params, "kl_warmup_epochs", 0),
        sample_every=getattr(params, "sample_every", 0),
        name="vae",
    )
    model(np.zeros((1, *input_shape), dtype="float32"))  # build: variables exist before fit
    return model


# --------------------------------------------------------------------------------------
# Training callbacks: KL warm-up and sample grids
# --------------------------------------------------------------------------------------


class KLWarmUp(keras.callbacks.Callback):
    """Raises the model's ``kl`` term weight linearly from 0 to ``target``.

    Before epoch ``e`` (0-based) the weight is ``target * min(1, e / epochs)``: 0 in
    the first epoch, ``target`` from epoch ``epochs`` on. At the end of training the
    weight is set to ``target``, so evaluation (and the saved model) use the
    configured value even when training stopped during the warm-up.
    """

    def __init__(self, target: float, epochs: int, term: str = "kl") -> None:
        super().__init__()
        if epochs < 1:
            raise ValueError(f"KLWarmUp needs epochs >= 1, got {epochs}")
        self.target = float(target)
        self.epochs = int(epochs)
        self.term = term

    def weight_at(self, epoch: int) -> float:
        """The weight used during epoch ``epoch`` (0-based)."""
        return self.target * min(1.0, epoch / self.epochs)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.model.loss_weights[self.term].assign(self.weight_at(epoch))

    def on_train_end(self, logs: Any = None) -> None:
        self.model.loss_weights[self.term].assign(self.target)


def callbacks(context: Any, model: VAE, data: DataBundle) -> list[Any]:
    """The registered callback hook of ``vae`` and ``cvae``: :class:`KLWarmUp` when
    ``kl_warmup_epochs > 0``, and a sample grid (:meth:`VAE.sample_grid`) every
    ``sample_every`` epochs for image data.

    The warm-up's target is the ``kl`` weight the train stage has set before calling
    this hook (the order is :func:`dlpipe.stages.train.fit.keras_fit`'s).
    """
    out: list[Any] = []
    if model.kl_warmup_epochs > 0:
        target = float(ops.convert_to_numpy(model.loss_weights["kl"]))
        out.append(KLWarmUp(target, model.kl_warmup_epochs))
    if model.sample_every > 0 and data.is_image:
        names = list(getattr(data, "class_names", None) or [])
        out.append(
            grids.sample_grid_callback(
                context, model.sample_every, lambda: model.sample_grid(names), model.value_range
            )
        )
    return out


# --------------------------------------------------------------------------------------
# Decoding NumPy arrays in batches
# --------------------------------------------------------------------------------------


def decode_batches(
    model: VAE, z: np.ndarray, labels: np.ndarray | None = None, batch: int = 256
) -> np.ndarray:
    """``model.decode`` over ``z`` (and labels) in batches, as NumPy."""
    out = []
    for i in range(0, len(z), batch):
        part = None if labels is None else labels[i : i + batch]
        out.append(ops.convert_to_numpy(model.decode(z[i : i + batch], part, training=False)))
    return np.concatenate(out) if out else np.zeros((0, *model.decoder.outputs[0].shape[1:]))
