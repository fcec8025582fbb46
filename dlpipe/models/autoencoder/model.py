"""A plain (optionally denoising) autoencoder for the ``autoencoder`` architecture.

In the spirit of the keras-io autoencoder examples: an encoder maps an input to a
latent vector ``z`` and a decoder maps ``z`` back to input space; both are Dense
stacks (``dense``) or stride-2 convolutions (``conv``). With ``noise_std > 0`` the
model is a *denoising* autoencoder: Gaussian noise is added to the input during
training only, and the loss compares the reconstruction with the *clean* input.

The loss has one named term, ``reconstruction`` (squared error or binary
cross-entropy, summed over the values of an example and averaged over the batch),
weighted by ``Autoencoder.loss_weights["reconstruction"]``. It is computed in an
overridden ``compute_loss``, so Keras's own ``train_step`` does the rest (mixed
precision loss scaling included); the loss is scaled for the replica count like a
built-in loss. ``model(x)`` returns reconstructions shaped like ``x``. The figures are
in :mod:`dlpipe.models.autoencoder.plots`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models.autoencoder import AutoencoderParams
from dlpipe.models.common import encoder_trunk, make_loss_weights, replica_scaled
from dlpipe.models.grids import value_range_of
from dlpipe.models.vae.model import build_decoder

LOSS_TERMS = ("reconstruction",)


@keras.saving.register_keras_serializable(package="dlpipe")
class Autoencoder(keras.Model):
    """``decoder(encoder(x))``, trained to reproduce its (clean) input.

    :param encoder: a model mapping inputs to latent vectors ``(batch, latent_dim)``.
    :param decoder: a model mapping latent vectors back to input-shaped outputs.
    :param reconstruction: ``mse`` or ``bce`` (needs outputs and inputs in [0, 1]).
    :param noise_std: std of the Gaussian input noise during training (0: none).
    :param seed: seed of that noise.

    Compile with an optimizer only: the loss is built in.
    """

    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        reconstruction: str = "mse",
        noise_std: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reconstruction not in ("mse", "bce"):
            raise ValueError(f"reconstruction must be 'mse' or 'bce', not {reconstruction!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, not {noise_std}")
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction = reconstruction
        self.noise_std = float(noise_std)
        self.seed = seed
        # GaussianNoise is active only when called with training=True.
        self.noise = layers.GaussianNoise(self.noise_std, seed=seed, name="input_noise")
        self.latent_dim = int(decoder.inputs[0].shape[-1])
        self.loss_weights = make_loss_weights(LOSS_TERMS)

    def encode(self, x: Any, training: bool | None = None) -> Any:
        """Latent vectors of a batch (no input noise)."""
        return self.encoder(x, training=training)

    def decode(self, z: Any, training: bool | None = None) -> Any:
        return self.decoder(z, training=training)

    def build(self, input_shape: Any = None) -> None:
        self.noise.build(input_shape)
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = self.noise(inputs, training=training) if self.noise_std > 0 else inputs
        return self.decode(self.encode(x, training=training), training=training)

    def reconstruction_error(self, x: Any, x_hat: Any) -> Any:
        """Per-example reconstruction error (float32), summed over the values."""
        x = ops.cast(x, "float32")
        x_hat = ops.cast(x_hat, "float32")
        if self.reconstruction == "bce":
            per_value = ops.binary_crossentropy(x, x_hat)
        else:
            per_value = ops.square(x - x_hat)
        return ops.sum(ops.reshape(per_value, (ops.shape(x)[0], -1)), axis=1)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        # The target is the clean input x; labels (y) are ignored. Keras's train_step
        # expects a loss already scaled for the replica count (it unscales it for the
        # "loss" metric), like its built-in losses.
        loss = ops.mean(self.reconstruction_error(x, y_pred))
        return replica_scaled(self.loss_weights["reconstruction"] * loss)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "reconstruction": self.reconstruction,
            "noise_std": self.noise_std,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Autoencoder:
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


def build_encoder(
    input_shape: tuple[int, ...], kind: str, hidden: list[int], latent_dim: int, activation: str
) -> keras.Model:
    """``x -> z``: Dense layers, or stride-2 Conv2D blocks, then a linear Dense."""
    inputs = keras.Input(shape=input_shape, name="x")
    h = encoder_trunk(inputs, kind, hidden, activation)
    z = layers.Dense(latent_dim, dtype="float32", name="z")(h)
    return keras.Model(inputs, z, name="encoder")


def output_activation(name: str, reconstruction: str, value_range: tuple[float, float]) -> str:
    """``auto``: sigmoid for [0, 1] data (and bce), tanh for [-1, 1], else linear."""
    if name != "auto":
        return name
    if reconstruction == "bce" or tuple(value_range) == (0.0, 1.0):
        return "sigmoid"
    if tuple(value_range) == (-1.0, 1.0):
        return "tanh"
    return "linear"


def _check(
    params: AutoencoderParams, input_shape: tuple[int, ...], value_range: tuple[float, float]
) -> None:
    if not params.hidden:
        raise ConfigError("autoencoder: 'hidden' must list at least one width / filter count")
    if params.encoder == "conv":
        if len(input_shape) != 3:
            raise ConfigError(
                f"autoencoder: encoder 'conv' needs images (height, width, channels), got "
                f"input shape {input_shape}; use encoder 'dense'"
            )
        factor = 2 ** len(params.hidden)
        if input_shape[0] % factor or input_shape[1] % factor:
            raise ConfigError(
                f"autoencoder: {len(params.hidden)} stride-2 conv blocks need height and "
                f"width divisible by {factor}, got {input_shape[:2]}; use fewer 'hidden' "
                "entries or resize the images (data param image_size)"
            )
    low, high = value_range
    if params.reconstruction == "bce" and (low < 0 or high > 1):
        raise ConfigError(
            f"autoencoder: reconstruction 'bce' needs inputs in [0, 1], the data's value "
            f"range is {tuple(value_range)}; rescale the data or use reconstruction 'mse'"
        )


def build(params: AutoencoderParams, data: DataBundle) -> Autoencoder:
    """The registered builder: a built, uncompiled :class:`Autoencoder` for ``data``."""
    input_shape = tuple(data.input_shape)
    value_range = value_range_of(data)
    _check(params, input_shape, value_range)
    hidden = list(params.hidden)
    encoder = build_encoder(
        input_shape, params.encoder, hidden, params.latent_dim, params.activation
    )
    decoder = build_decoder(
        input_shape,
        params.encoder,
        hidden,
        params.latent_dim,
        params.activation,
        output_activation(params.output_activation, params.reconstruction, value_range),
    )
    seed = int(np.random.randint(1, 2**31 - 1))
    model = Autoencoder(
        encoder,
        decoder,
        reconstruction=params.reconstruction,
        noise_std=params.noise_std,
        seed=seed,
        name="autoencoder",
    )
    model(np.zeros((1, *input_shape), dtype="float32"))  # variables exist before fit
    return model
