"""A variational autoencoder (Kingma & Welling, 2014) for the ``vae`` architecture.

In the spirit of the keras-io example ``examples/generative/vae.py``: an encoder maps
an input to the mean and log-variance of a Gaussian over the latent space, a
:class:`Sampling` layer draws ``z`` with the reparameterization trick, and a decoder
maps ``z`` back to input space. The loss is a weighted sum of two named terms,

* ``reconstruction``: binary cross-entropy (``bce``) or squared error (``mse``),
  summed over the pixels of an image and averaged over the batch;
* ``kl``: the KL divergence of the latent Gaussian from the unit Gaussian, summed
  over the latent dimensions and averaged over the batch;

whose weights are the variables in ``VAE.term_weights`` (a ``kl`` weight other than 1
gives a beta-VAE). Training reports ``loss``, ``reconstruction_loss`` and ``kl_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.models.common import apply_gradients, encoder_trunk, make_term_weights, replica_scaled

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


@keras.saving.register_keras_serializable(package="dlpipe")
class VAE(keras.Model):
    """An encoder, a sampler and a decoder, trained on the negative ELBO.

    :param encoder: a model mapping inputs to ``(z_mean, z_log_var)``.
    :param decoder: a model mapping ``z`` to a reconstruction shaped like the input
        (probabilities in ``[0, 1]`` for ``bce``).
    :param reconstruction: ``bce`` or ``mse``.
    :param seed: seed of the sampler's noise; ``None`` draws one (from Python's
        ``random``, which ``keras.utils.set_random_seed`` seeds).

    ``model(x)`` decodes the latent mean (deterministic); ``model(x, training=True)``
    decodes a sample. Compile with an optimizer only: the loss is built in.
    """

    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        reconstruction: str = "bce",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reconstruction not in ("bce", "mse"):
            raise ValueError(f"reconstruction must be 'bce' or 'mse', not {reconstruction!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction = reconstruction
        self.seed = seed
        self.sampler = Sampling(seed=seed, name="sampling")
        self.latent_dim = int(decoder.inputs[0].shape[-1])
        self.term_weights = make_term_weights(LOSS_TERMS)
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    # --- the network --------------------------------------------------------------

    def encode(self, x: Any, training: bool | None = None) -> tuple[Any, Any]:
        """``(z_mean, z_log_var)`` of a batch."""
        z_mean, z_log_var = self.encoder(x, training=training)
        return z_mean, z_log_var

    def decode(self, z: Any, training: bool | None = None) -> Any:
        """The reconstructions of a batch of latent vectors."""
        return self.decoder(z, training=training)

    def sample(self, n: int, seed: Any = None) -> Any:
        """Decode ``n`` latent vectors drawn from the prior ``N(0, I)``.

        ``seed`` is passed to ``keras.random.normal``; by default the sampler's seed
        generator is used (and advanced).
        """
        seed = self.sampler.seed_generator if seed is None else seed
        z = keras.random.normal((n, self.latent_dim), seed=seed)
        return self.decode(z, training=False)

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

    def loss_terms(self, x: Any, training: bool = False) -> tuple[Any, dict[str, Any]]:
        """The weighted total loss of a batch and its unweighted terms (float32)."""
        z_mean, z_log_var = self.encode(x, training=training)
        z = self.sampler((z_mean, z_log_var))
        x_hat = ops.cast(self.decode(z, training=training), "float32")
        x = ops.cast(x, "float32")
        z_mean = ops.cast(z_mean, "float32")
        z_log_var = ops.cast(z_log_var, "float32")

        if self.reconstruction == "bce":
            per_value = ops.binary_crossentropy(x, x_hat)
        else:
            per_value = ops.square(x - x_hat)
        per_example = ops.sum(ops.reshape(per_value, (ops.shape(x)[0], -1)), axis=1)
        kl = -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1)
        terms = {"reconstruction": ops.mean(per_example), "kl": ops.mean(kl)}
        total = sum(self.term_weights[name] * value for name, value in terms.items())
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
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            total, terms = self.loss_terms(x, training=True)
            scaled = replica_scaled(total)
        apply_gradients(self.optimizer, tape, scaled, self.trainable_variables)
        return self._track(total, terms)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        total, terms = self.loss_terms(x, training=False)
        return self._track(total, terms)

    # --- serialization ------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "reconstruction": self.reconstruction,
            "seed": self.seed,
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


def build_encoder(
    input_shape: tuple[int, ...], kind: str, hidden: list[int], latent_dim: int, activation: str
) -> keras.Model:
    """``x -> (z_mean, z_log_var)``: Dense layers, or stride-2 Conv2D blocks."""
    inputs = keras.Input(shape=input_shape, name="x")
    h = encoder_trunk(inputs, kind, hidden, activation)
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
) -> keras.Model:
    """``z -> x_hat``, the mirror image of :func:`build_encoder`."""
    z = keras.Input(shape=(latent_dim,), name="z")
    if kind == "conv":
        height, width, channels = output_shape
        factor = 2 ** len(hidden)
        start = (height // factor, width // factor, hidden[-1])
        h = layers.Dense(math.prod(start), activation=activation, name="dense")(z)
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
        h = z
        for i, units in enumerate(reversed(hidden)):
            h = layers.Dense(units, activation=activation, name=f"dense_{i}")(h)
        h = layers.Dense(
            math.prod(output_shape), activation=output_activation, dtype="float32", name="x_hat"
        )(h)
        x_hat = layers.Reshape(output_shape, dtype="float32", name="reshape")(h)
    return keras.Model(z, x_hat, name="decoder")


def _check(params: Any, input_shape: tuple[int, ...], value_range: tuple[float, float]) -> None:
    if not params.hidden:
        raise ValueError("vae: 'hidden' must list at least one layer width / filter count")
    if params.encoder == "conv":
        if len(input_shape) != 3:
            raise ValueError(
                f"vae: encoder 'conv' needs images (height, width, channels), "
                f"got input shape {input_shape}; use encoder 'dense'"
            )
        factor = 2 ** len(params.hidden)
        if input_shape[0] % factor or input_shape[1] % factor:
            raise ValueError(
                f"vae: {len(params.hidden)} stride-2 conv blocks need height and width "
                f"divisible by {factor}, got {input_shape[:2]}; use fewer 'hidden' entries"
            )
    low, high = value_range
    if params.reconstruction == "bce" and (low < 0 or high > 1):
        raise ValueError(
            f"vae: reconstruction 'bce' needs inputs in [0, 1], the data's value range "
            f"is {tuple(value_range)}; rescale the data or use reconstruction 'mse'"
        )


def build(params: Any, data: Any) -> VAE:
    """The registered builder: a built, uncompiled :class:`VAE` for ``data``'s inputs.

    The sampler's seed is drawn from NumPy's global generator, so a build after
    ``keras.utils.set_random_seed(s)`` is reproducible (and the seed is saved).
    """
    input_shape = tuple(data.input_shape)
    _check(params, input_shape, getattr(data, "value_range", (0.0, 1.0)))
    out_activation = "sigmoid" if params.reconstruction == "bce" else "linear"
    encoder = build_encoder(
        input_shape, params.encoder, list(params.hidden), params.latent_dim, params.activation
    )
    decoder = build_decoder(
        input_shape,
        params.encoder,
        list(params.hidden),
        params.latent_dim,
        params.activation,
        out_activation,
    )
    seed = int(np.random.randint(1, 2**31 - 1))
    model = VAE(encoder, decoder, reconstruction=params.reconstruction, seed=seed, name="vae")
    model(np.zeros((1, *input_shape), dtype="float32"))  # build: variables exist before fit
    return model


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _split(data: Any) -> str:
    for split in ("test", "val", "train"):
        if data.size(split) > 0:
            return split
    raise ValueError("vae plots: the data has no non-empty split")


def _image(array: np.ndarray) -> np.ndarray:
    """(h, w, 1) -> (h, w) for imshow; colour images stay (h, w, 3)."""
    return array[..., 0] if array.shape[-1] == 1 else array


def _tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, h, w, c) -> one (rows * h, cols * w, c) image."""
    n, h, w, c = images.shape
    grid = images[: rows * cols].reshape(rows, cols, h, w, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _figure(width: float, height: float) -> Any:
    # A bare Figure: no pyplot state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 8.0), min(height, 8.0)))


def _show(ax: Any, image: np.ndarray, vrange: tuple[float, float]) -> None:
    image = np.clip(image, *vrange)
    if image.shape[-1] == 3:
        image = (image - vrange[0]) / max(vrange[1] - vrange[0], 1e-12)
    ax.imshow(_image(image), cmap="gray", vmin=vrange[0], vmax=vrange[1])
    ax.set_axis_off()


def _predict(fn: Any, x: np.ndarray, batch_size: int = 256) -> Any:
    """``fn`` over ``x`` in batches, as NumPy (a tuple of arrays for tuple outputs)."""
    outputs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if isinstance(outputs[0], (tuple, list)):
        return tuple(
            np.concatenate([ops.convert_to_numpy(o[k]) for o in outputs])
            for k in range(len(outputs[0]))
        )
    return np.concatenate([ops.convert_to_numpy(o) for o in outputs])


def plot_reconstructions(model: VAE, x: np.ndarray, vrange: tuple[float, float]) -> Any:
    n = min(10, len(x))
    x_hat = _predict(lambda b: model(b, training=False), x[:n])
    fig = _figure(0.8 * n, 1.8)
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
    images = _predict(lambda b: model.decode(b, training=False), z)
    fig = _figure(8, 8)
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


def plot_latent_scatter(model: VAE, x: np.ndarray, y: np.ndarray | None) -> Any:
    """``z_mean`` of ``x`` in 2-D (PCA when latent_dim > 2), coloured by label."""
    limit = 5000
    x = x[:limit]
    z_mean, _ = _predict(lambda b: model.encode(b, training=False), x)
    z_mean = z_mean.reshape(len(z_mean), -1)
    if z_mean.shape[1] > 2:
        centred = z_mean - z_mean.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, labels = centred @ vt[:2].T, ("PC 1", "PC 2")
    elif z_mean.shape[1] == 2:
        points, labels = z_mean, ("z[0]", "z[1]")
    else:
        points = np.concatenate([z_mean, np.zeros_like(z_mean)], axis=1)
        labels = ("z[0]", "")
    fig = _figure(6, 5)
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
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title("latent space (z_mean)")
    return fig


def plot_samples(model: VAE, vrange: tuple[float, float], n: int = 8, seed: int = 0) -> Any:
    images = ops.convert_to_numpy(model.sample(n * n, seed=seed))
    fig = _figure(6, 6)
    ax = fig.subplots()
    _show(ax, _tile(images, n, n), vrange)
    ax.set_title("samples from the prior")
    return fig


def plots(context: Any, model: VAE, data: Any) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: yields ``(filename, figure)``.

    ``reconstructions.png``, ``latent_manifold.png`` (latent_dim 2), ``samples.png``
    for image data, and ``latent_scatter.png`` always. ``context`` is not used.
    """
    split = _split(data)
    x = np.asarray(data.x[split], dtype="float32")
    y = data.y.get(split)
    vrange = tuple(float(v) for v in getattr(data, "value_range", (0.0, 1.0)))
    if data.is_image:
        yield "reconstructions.png", plot_reconstructions(model, x, vrange)
        if model.latent_dim == 2:
            yield "latent_manifold.png", plot_latent_manifold(model, vrange)
    yield "latent_scatter.png", plot_latent_scatter(model, x, y)
    if data.is_image:
        yield "samples.png", plot_samples(model, vrange)
