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

Plots: reconstructions, the latent scatter, samples from the prior, the 2-D latent
manifold (``latent_dim`` 2) and a *latent traversal*: one latent dimension varied over
``[-3, 3]`` at a time, the others at 0, one row per dimension (the most used
dimensions first), which is how a beta-VAE's disentangled factors are looked at.

The conditional VAE in :mod:`dlpipe.models.cvae.model` subclasses :class:`VAE`; that is why
:meth:`VAE.encode`, :meth:`VAE.decode` and :meth:`VAE.generate_samples` take
``labels`` (ignored here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.models import grids
from dlpipe.models.common import apply_gradients, encoder_trunk, make_loss_weights, replica_scaled

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
    params: Any, input_shape: tuple[int, ...], value_range: Sequence[float], arch: str = "vae"
) -> None:
    """Clear errors for settings the data cannot support."""
    if not params.hidden:
        raise ValueError(f"{arch}: 'hidden' must list at least one layer width / filter count")
    if params.encoder == "conv":
        if len(input_shape) != 3:
            raise ValueError(
                f"{arch}: encoder 'conv' needs images (height, width, channels), "
                f"got input shape {input_shape}; use encoder 'dense'"
            )
        factor = 2 ** len(params.hidden)
        if input_shape[0] % factor or input_shape[1] % factor:
            raise ValueError(
                f"{arch}: {len(params.hidden)} stride-2 conv blocks need height and width "
                f"divisible by {factor}, got {input_shape[:2]}; use fewer 'hidden' entries"
            )
    low, high = value_range
    if params.reconstruction == "bce" and (low < 0 or high > 1):
        raise ValueError(
            f"{arch}: reconstruction 'bce' needs inputs in [0, 1], the data's value range "
            f"is {tuple(value_range)}; rescale the data or use reconstruction 'mse'"
        )


def networks(params: Any, data: Any, num_classes: int = 0) -> tuple[keras.Model, keras.Model]:
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


def value_range_of(data: Any) -> tuple[float, float]:
    low, high = getattr(data, "value_range", (0.0, 1.0))
    return float(low), float(high)


def build(params: Any, data: Any) -> VAE:
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


class SampleGrid(keras.callbacks.Callback):
    """Logs ``figure()`` to ``context`` every ``every`` epochs, as
    ``samples/samples_epoch_NNN.png`` (NNN counts epochs from 1)."""

    def __init__(self, context: Any, every: int, figure: Callable[[int], Any]) -> None:
        super().__init__()
        self.context = context
        self.every = int(every)
        self.figure = figure

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        done = epoch + 1
        if self.every > 0 and done % self.every == 0:
            self.context.log_figure(self.figure(done), f"samples_epoch_{done:03d}.png", "samples")


def callbacks(context: Any, model: VAE, data: Any) -> list[Any]:
    """The registered callback hook of ``vae`` and ``cvae``.

    :class:`KLWarmUp` when ``kl_warmup_epochs > 0``, its target being the ``kl`` weight
    the train stage has just set from ``loss_weights`` (the hook is called after
    that). :class:`SampleGrid` when ``sample_every > 0`` and the data are images.
    """
    out: list[Any] = []
    if model.kl_warmup_epochs > 0:
        target = float(ops.convert_to_numpy(model.loss_weights["kl"]))
        out.append(KLWarmUp(target, model.kl_warmup_epochs))
    if model.sample_every > 0 and data.is_image:
        names = list(getattr(data, "class_names", None) or [])
        out.append(
            SampleGrid(
                context,
                model.sample_every,
                lambda epoch: sample_figure(model, names, title=f"epoch {epoch}"),
            )
        )
    return out


# --------------------------------------------------------------------------------------
# Plots
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


def encode_batches(
    model: VAE, x: np.ndarray, labels: np.ndarray | None = None, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """``model.encode`` over ``x`` (and labels) in batches: ``(z_mean, z_log_var)``."""
    means, log_vars = [], []
    for i in range(0, len(x), batch):
        part = None if labels is None else labels[i : i + batch]
        z_mean, z_log_var = model.encode(x[i : i + batch], part, training=False)
        means.append(ops.convert_to_numpy(z_mean))
        log_vars.append(ops.convert_to_numpy(z_log_var))
    return np.concatenate(means), np.concatenate(log_vars)


def _image(array: np.ndarray) -> np.ndarray:
    """(h, w, 1) -> (h, w) for imshow; colour images stay (h, w, 3)."""
    return array[..., 0] if array.shape[-1] == 1 else array


def _tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, h, w, c) -> one (rows * h, cols * w, c) image."""
    n, h, w, c = images.shape
    grid = images[: rows * cols].reshape(rows, cols, h, w, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _show(ax: Any, image: np.ndarray, vrange: tuple[float, float]) -> None:
    image = np.clip(image, *vrange)
    if image.shape[-1] == 3:
        image = (image - vrange[0]) / max(vrange[1] - vrange[0], 1e-12)
    ax.imshow(_image(image), cmap="gray", vmin=vrange[0], vmax=vrange[1])
    ax.set_axis_off()


def plot_reconstructions(
    model: VAE, x: np.ndarray, vrange: tuple[float, float], labels: np.ndarray | None = None
) -> Any:
    n = min(10, len(x))
    z_mean, _ = encode_batches(model, x[:n], None if labels is None else labels[:n])
    x_hat = decode_batches(model, z_mean, None if labels is None else labels[:n])
    fig = grids.figure(0.8 * n, 1.8)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        _show(axes[0, i], x[i], vrange)
        _show(axes[1, i], x_hat[i], vrange)
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    return fig


def plot_latent_manifold(model: VAE, vrange: tuple[float, float], n: int = 15) -> Any:
    """Decodes an ``n x n`` grid of ``z`` in [-2.5, 2.5]^2 (latent_dim 2 only)."""
    grid = np.linspace(-2.5, 2.5, n, dtype="float32")
    # Rows from top to bottom: z[1] decreasing; columns: z[0] increasing.
    z = np.array([[zx, zy] for zy in grid[::-1] for zx in grid], dtype="float32")
    images = decode_batches(model, z)
    fig = grids.figure(8, 8)
    ax = fig.subplots()
    _show(ax, _tile(images, n, n), vrange)
    ax.set_axis_on()
    h, w = images.shape[1:3]
    ticks = [0, n // 2, n - 1]
    ax.set_xticks([(t + 0.5) * w for t in ticks], [f"{grid[t]:.1f}" for t in ticks])
    ax.set_yticks([(t + 0.5) * h for t in ticks], [f"{grid[::-1][t]:.1f}" for t in ticks])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("latent manifold")
    return fig


def plot_latent_scatter(
    model: VAE, x: np.ndarray, y: np.ndarray | None, labels: np.ndarray | None = None
) -> Any:
    """``z_mean`` of ``x`` in 2-D (PCA when latent_dim > 2), coloured by label ``y``.

    ``labels`` are what the encoder is conditioned on (a conditional VAE), else None.
    """
    limit = 5000
    x = x[:limit]
    z_mean, _ = encode_batches(model, x, None if labels is None else labels[:limit])
    z_mean = z_mean.reshape(len(z_mean), -1)
    if z_mean.shape[1] > 2:
        centred = z_mean - z_mean.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, axis_names = centred @ vt[:2].T, ("PC 1", "PC 2")
    elif z_mean.shape[1] == 2:
        points, axis_names = z_mean, ("z[0]", "z[1]")
    else:
        points = np.concatenate([z_mean, np.zeros_like(z_mean)], axis=1)
        axis_names = ("z[0]", "")
    fig = grids.figure(6, 5)
    ax = fig.subplots()
    colour = None
    if y is not None:
        y = np.asarray(y)[:limit]
        if y.ndim > 1 and y.shape[-1] > 1:  # one-hot
            y = y.argmax(axis=-1)
        colour = y.reshape(len(y))
    if colour is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7)
    else:
        art = ax.scatter(points[:, 0], points[:, 1], c=colour, s=4, cmap="tab10", alpha=0.7)
        fig.colorbar(art, ax=ax, label="label")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("latent space (z_mean)")
    return fig


def plot_samples(model: VAE, vrange: tuple[float, float], n: int = 8, seed: int = 0) -> Any:
    images = ops.convert_to_numpy(model.sample(n * n, seed=seed))
    fig = grids.figure(6, 6)
    ax = fig.subplots()
    _show(ax, _tile(images, n, n), vrange)
    ax.set_title("samples from the prior")
    return fig


def sample_figure(model: VAE, class_names: Sequence[str] = (), title: str = "") -> Any:
    """A fixed-seed grid of :meth:`VAE.generate_samples`: 8 x 8 for a VAE (the
    conditional VAE overrides this with one row per class)."""
    images = model.generate_samples(64, seed=0)
    return grids.grid_figure(images, model.value_range, 8, title=title or "samples")


def latent_activity(
    model: VAE, x: np.ndarray, labels: np.ndarray | None = None, limit: int = 1000
) -> np.ndarray:
    """Mean KL per latent dimension over (up to ``limit`` of) ``x``: how much each
    dimension is used; dimensions near 0 are collapsed to the prior."""
    z_mean, z_log_var = encode_batches(model, x[:limit], None if labels is None else labels[:limit])
    return ops.convert_to_numpy(kl_divergence(z_mean, z_log_var)).mean(axis=0)


def traversal_latents(latent_dim: int, dims: Sequence[int], values: np.ndarray) -> np.ndarray:
    """``(len(dims) * len(values), latent_dim)`` codes: row ``r`` sets dimension
    ``dims[r]`` to each of ``values`` in turn, every other dimension 0."""
    z = np.zeros((len(dims), len(values), latent_dim), dtype="float32")
    for r, d in enumerate(dims):
        z[r, :, d] = values
    return z.reshape(-1, latent_dim)


def plot_latent_traversal(
    model: VAE,
    x: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    max_dims: int = 8,
    steps: int = 9,
    limit: float = 3.0,
    title: str = "latent traversal",
) -> Any:
    """Decodes ``z`` with one dimension swept over ``[-limit, limit]`` per row.

    With data ``x`` the rows are the ``max_dims`` most used dimensions (highest mean
    KL), labelled with it; without, the first ``max_dims``. ``labels`` condition the
    encoder (for the activity) and the decoder (one label per traversal image, or a
    single label for all) of a conditional VAE.
    """
    values = np.linspace(-limit, limit, steps, dtype="float32")
    if x is not None and len(x):
        kl = latent_activity(model, x, labels)
        dims = [int(d) for d in np.argsort(-kl)[:max_dims]]
        names = [f"z[{d}] KL {kl[d]:.2f}" for d in dims]
    else:
        dims = list(range(min(max_dims, model.latent_dim)))
        names = [f"z[{d}]" for d in dims]
    z = traversal_latents(model.latent_dim, dims, values)
    cond = model.class_labels(len(z), None if labels is None else labels[:1])
    images = decode_batches(model, z, cond)
    title = f"{title}: each row sweeps one z from {-limit:g} to {limit:g}, others 0"
    return grids.grid_figure(images, model.value_range, steps, title=title, row_labels=names)


def plots(context: Any, model: VAE, data: Any) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: yields ``(filename, figure)``.

    ``reconstructions.png``, ``latent_manifold.png`` (latent_dim 2), ``samples.png``
    and ``latent_traversal.png`` for image data, and ``latent_scatter.png`` always.
    ``context`` is not used.
    """
    split = grids.first_split(data)
    x = np.asarray(data.x[split], dtype="float32")
    y = data.y.get(split)
    vrange = value_range_of(data)
    if data.is_image:
        yield "reconstructions.png", plot_reconstructions(model, x, vrange)
        if model.latent_dim == 2:
            yield "latent_manifold.png", plot_latent_manifold(model, vrange)
    yield "latent_scatter.png", plot_latent_scatter(model, x, y)
    if data.is_image:
        yield "samples.png", plot_samples(model, vrange)
        yield "latent_traversal.png", plot_latent_traversal(model, x)
