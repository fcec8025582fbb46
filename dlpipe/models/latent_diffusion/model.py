"""Latent diffusion: DDPM/DDIM in the latent space of a trained autoencoder or VAE.

The idea (Rombach et al., 2022, "High-resolution image synthesis with latent diffusion
models"): an autoencoder already compresses images into a small latent code and back.
Diffusing in that code space instead of pixel space is far cheaper, and the decoder
turns every latent sample into an image. Here:

1. The **source model** is any model with an ``encoder`` and a ``decoder`` sub-model,
   as :mod:`dlpipe.models.autoencoder.model` and :mod:`dlpipe.models.vae.model` have. It comes
   from an earlier model stage of the same pipeline (``autoencoder: {stage: NAME}``,
   read from ``context.models``), from another run (``{run_id: ID}``: its logged
   ``model`` artifact), from a model URI (``models:/NAME@alias``, ``models:/NAME/1``,
   ``runs:/ID/model``) or from a local ``.keras`` file or model folder. Its encoder and
   decoder are copied and frozen. An encoder with two outputs is read as a VAE's
   ``(z_mean, z_log_var)`` and its mean is used.
2. The latents of the training split are encoded once at build time to get their
   per-dimension mean and standard deviation; diffusion runs on the *standardized*
   latents, so the ``N(0, I)`` the reverse process starts from matches their scale.
   (Each training step encodes its batch again with the frozen encoder: cheap for
   these small models, and augmentation keeps working.)
3. The noise predictor is an MLP with residual blocks (LayerNorm -> Dense, plus the
   time/label embedding -> swish -> Dense), conditioned exactly like the pixel U-Net
   (class labels, classifier-free guidance).
4. Schedules, training step, EMA and samplers are :class:`~dlpipe.models.ddpm.model.
   DiffusionModel`'s: this subclass only replaces :meth:`to_diffusion` (encode and
   standardize) and :meth:`from_diffusion` (unstandardize and decode), so sample grids,
   trajectories (decoded latents along the reverse process) and ``generate_samples``
   all return images.

Without a context (the conformance test builds ``build(params, data, None)``) and
without ``run_id``/``uri``, a tiny untrained dense autoencoder is built on the spot so
the model still trains a step; a real pipeline gets an error instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import keras
import numpy as np
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models import grids
from dlpipe.models.ddpm.model import DiffusionModel, class_count, sampling_options
from dlpipe.models.ddpm.unet import conditioning_embedding
from dlpipe.models.grids import value_range_of
from dlpipe.models.latent_diffusion import LatentDiffusionParams, SourceModel

# --------------------------------------------------------------------------------------
# The latent denoiser
# --------------------------------------------------------------------------------------


def build_latent_denoiser(
    latent_dim: int, width: int, depth: int, num_classes: int = 0, emb_dim: int | None = None
) -> keras.Model:
    """``[z_t, t]`` (+ ``label``) -> predicted noise ``(batch, latent_dim)``, float32."""
    emb_dim = int(emb_dim or width)
    z_t = keras.Input(shape=(latent_dim,), name="x_t")
    t = keras.Input(shape=(1,), dtype="int32", name="t")
    inputs = [z_t, t]
    label = None
    if num_classes:
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        inputs.append(label)
    emb = conditioning_embedding(t, label, emb_dim, num_classes, max(2, 2 * (emb_dim // 4)))
    emb = layers.Activation("swish", name="emb_act")(emb)
    h = layers.Dense(width, name="in")(z_t)
    for i in range(depth):
        r = layers.Dense(width, name=f"block{i}_dense0")(
            layers.LayerNormalization(name=f"block{i}_norm")(h)
        )
        r = layers.Add(name=f"block{i}_add_emb")(
            [r, layers.Dense(width, name=f"block{i}_emb")(emb)]
        )
        r = layers.Dense(width, name=f"block{i}_dense1")(
            layers.Activation("swish", name=f"block{i}_act")(r)
        )
        h = layers.Add(name=f"block{i}_out")([h, r])
    h = layers.Activation("swish", name="out_act")(layers.LayerNormalization(name="out_norm")(h))
    eps = layers.Dense(latent_dim, kernel_initializer="zeros", dtype="float32", name="noise")(h)
    return keras.Model(inputs, eps, name="latent_denoiser")


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def first_output(outputs: Any) -> Any:
    """An encoder's latent: the only output, or the first (a VAE's ``z_mean``)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


@keras.saving.register_keras_serializable(package="dlpipe")
class LatentDiffusion(DiffusionModel):
    """A :class:`DiffusionModel` over standardized latents of a frozen encoder/decoder.

    :param network: the latent noise predictor (see :func:`build_latent_denoiser`).
    :param encoder: ``x -> z`` or ``x -> (z_mean, z_log_var)``; frozen.
    :param decoder: ``z -> x``; frozen.
    :param latent_mean, latent_std: per-dimension statistics of the training latents.

    Other parameters as :class:`DiffusionModel` (``clip_denoised`` defaults to None:
    latents are not bounded).
    """

    def __init__(
        self,
        network: keras.Model,
        encoder: keras.Model,
        decoder: keras.Model,
        latent_mean: Any,
        latent_std: Any,
        clip_denoised: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, clip_denoised=clip_denoised, **kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.encoder.trainable = False
        self.decoder.trainable = False
        self.latent_mean = [float(v) for v in np.ravel(latent_mean)]
        self.latent_std = [float(v) for v in np.ravel(latent_std)]
        if len(self.latent_mean) != self.sample_shape[0] or len(self.latent_std) != len(
            self.latent_mean
        ):
            raise ValueError(
                f"latent statistics of size {len(self.latent_mean)}/{len(self.latent_std)} "
                f"do not match the denoiser's latent size {self.sample_shape[0]}"
            )

    def encode(self, x: Any) -> Any:
        """Raw latents ``(batch, latent_dim)`` of data ``x`` (float32)."""
        z = first_output(self.encoder(x, training=False))
        return ops.reshape(ops.cast(z, "float32"), (ops.shape(z)[0], -1))

    def to_diffusion(self, x: Any) -> Any:
        mean = ops.convert_to_tensor(np.asarray(self.latent_mean, "float32"))
        std = ops.convert_to_tensor(np.asarray(self.latent_std, "float32"))
        return (self.encode(x) - mean) / std

    def from_diffusion(self, z: Any) -> Any:
        mean = ops.convert_to_tensor(np.asarray(self.latent_mean, "float32"))
        std = ops.convert_to_tensor(np.asarray(self.latent_std, "float32"))
        z = ops.cast(z, "float32") * std + mean
        return ops.cast(self.decoder(z, training=False), "float32")

    def output_sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.decoder.outputs[0].shape[1:])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "latent_mean": list(self.latent_mean),
            "latent_std": list(self.latent_std),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LatentDiffusion:
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(network, encoder, decoder, **config)


# --------------------------------------------------------------------------------------
# Finding the source autoencoder
# --------------------------------------------------------------------------------------


def has_codec(model: Any) -> bool:
    """Whether ``model`` has ``encoder`` and ``decoder`` Keras sub-models."""
    return isinstance(getattr(model, "encoder", None), keras.Model) and isinstance(
        getattr(model, "decoder", None), keras.Model
    )


def tracking_uri_of(source: SourceModel, context: Any) -> str:
    """``source.tracking_uri``, else the spec's ``tracking.uri``, else dlpipe's default."""
    from dlpipe import paths

    uri = source.tracking_uri
    if uri is None and context is not None:
        uri = context.spec.settings.tracking.uri
    return paths.absolute_sqlite(uri) if uri else paths.default_tracking_uri()


def download_dir(context: Any) -> str:
    if context is not None:
        folder = Path(context.run_dir) / "source_model"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    return tempfile.mkdtemp(prefix="dlpipe-source-")


def find_keras_file(path: Path) -> Path:
    """``path`` itself, or the single ``.keras`` file in a downloaded folder."""
    if path.is_file():
        return path
    found = sorted(path.rglob("*.keras")) if path.is_dir() else []
    if not found:
        raise DlpipeError(f"latent_diffusion: no .keras model file at {path}")
    return found[0]


def load_source(source: Any, context: Any) -> Any:
    """The source model: an earlier stage's, or one loaded from MLflow / a file."""
    if source.stage:
        models = dict(getattr(context, "models", None) or {})
        if source.stage not in models:
            raise DlpipeError(
                f"latent_diffusion: autoencoder.stage {source.stage!r} is not an earlier model "
                f"stage of this pipeline; earlier model stages: {sorted(models) or 'none'}"
            )
        return models[source.stage]
    from dlpipe import packaging

    # dlpipe.packaging resolves the reference (runs:/, models:/NAME@alias, models:/NAME/1)
    # in this store and imports the modules of the model's classes before loading it.
    uri = tracking_uri_of(source, context)
    if source.run_id:
        reference = f"runs:/{source.run_id}/{source.artifact_path}"
    elif len(urlparse(source.uri).scheme) <= 1:
        # a local path (no scheme, or a Windows drive letter): a .keras file or a
        # folder holding one (an MLflow model folder, say)
        reference = str(find_keras_file(Path(source.uri)))
    else:
        reference = source.uri
    return packaging.load_keras_model(reference, uri, dst=download_dir(context))


def fresh_autoencoder(data: DataBundle, latent_dim: int = 4) -> Any:
    """A tiny untrained dense autoencoder (only for builds without a context)."""
    from dlpipe.models.autoencoder import AutoencoderParams
    from dlpipe.models.autoencoder import model as autoencoder

    return autoencoder.build(AutoencoderParams(hidden=[16], latent_dim=latent_dim), data)


def source_model(params: LatentDiffusionParams, data: DataBundle, context: Any) -> Any:
    source = params.autoencoder
    if source is None:
        if context is None:
            return fresh_autoencoder(data)
        earlier = [m for m in (getattr(context, "models", None) or {}).values() if has_codec(m)]
        if not earlier:
            raise DlpipeError(
                "latent_diffusion: no autoencoder to diffuse in; add a model stage with an "
                "autoencoder or vae before this one, or set autoencoder: {run_id: ...}"
            )
        return earlier[-1]
    if source.stage and context is None:
        return fresh_autoencoder(data)
    return load_source(source, context)


def frozen_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with the same weights (the source model stays untouched)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.trainable = False
    return copy


def latent_statistics(encoder: keras.Model, x: np.ndarray, limit: int = 5000) -> tuple:
    """Per-dimension mean and std (floored at 1e-3) of the latents of ``x[:limit]``."""
    z = grids.predict_batches(lambda b: first_output(encoder(b, training=False)), x[:limit])
    z = np.asarray(z, dtype="float64").reshape(len(z), -1)
    return z.mean(axis=0), np.maximum(z.std(axis=0), 1e-3)


def build(params: LatentDiffusionParams, data: DataBundle, context: Any = None) -> LatentDiffusion:
    """The ``latent_diffusion`` builder (see the module docstring for the source model)."""
    source = source_model(params, data, context)
    if not has_codec(source):
        raise DlpipeError(
            f"latent_diffusion: the source model {getattr(source, 'name', source)!r} has no "
            "encoder and decoder sub-models; use an autoencoder or a vae"
        )
    decoded = tuple(int(d) for d in source.decoder.outputs[0].shape[1:])
    if decoded != tuple(data.input_shape):
        raise DlpipeError(
            f"latent_diffusion: the source model decodes to shape {decoded}, but the data's "
            f"inputs have shape {tuple(data.input_shape)}; use the data it was trained on"
        )
    encoder, decoder = frozen_copy(source.encoder), frozen_copy(source.decoder)
    mean, std = latent_statistics(encoder, np.asarray(data.x["train"], dtype="float32"))
    num_classes = class_count(params, data, "latent_diffusion")
    network = build_latent_denoiser(
        len(mean), params.width, params.depth, num_classes, params.emb_dim
    )
    model = LatentDiffusion(
        network,
        encoder,
        decoder,
        latent_mean=mean,
        latent_std=std,
        num_classes=num_classes,
        value_range=value_range_of(data),
        name="latent_diffusion",
        **sampling_options(params),
    )
    model.build(None)
    return model
