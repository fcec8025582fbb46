"""SRGAN: super-resolution with an adversarial loss (``srgan``).

After Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network", at laptop scale. Pixel-wise losses alone make a
super-resolution network predict the *average* of all plausible high-res images, which
looks blurry. SRGAN adds a discriminator that tells real high-res images from
upscaled ones, and trains the generator to fool it, pushing outputs towards sharp,
realistic detail (usually at a small cost in PSNR).

**Generator** (SRResNet), fully convolutional, at low resolution until the end::

    low-res -> Conv 9x9 + PReLU -> B x [Conv 3x3 -> PReLU -> Conv 3x3, + skip]
            -> Conv 3x3, + long skip
            -> log2(r) x [Conv 3x3 to 4 * filters -> depth_to_space(2) -> PReLU]
            -> Conv 9x9 to the image's channels

Batch normalization inside the residual blocks (the paper's choice) is optional and
off by default: ESRGAN (Wang et al. 2018) found that it causes artifacts, and it
behaves poorly with the small batches used here.

**Discriminator**: per entry of ``d_filters`` a 3x3 convolution and a stride-2 3x3
convolution with LeakyReLU(0.2), then Dense + LeakyReLU + a Dense logit.

**Losses.** Two named loss terms weight the generator's loss
(``train.loss_weights.content`` / ``.adversarial``; the tune stage can search both)::

    generator:     content * MSE(sr, hr) + adversarial * BCE(D(sr), real)
    discriminator: (BCE(D(hr), real) + BCE(D(sr), fake)) / 2

The content loss is the pixel MSE (the paper's "SRResNet-MSE" content loss, which is
also what PSNR measures; the paper's VGG-feature loss needs a pretrained network,
which this offline project does not have). ``adversarial`` defaults to 1e-3 as in the
paper. As in the paper the generator can first train on the content loss alone for
``pretrain_epochs`` epochs (the adversarial term is gated off by
:class:`AdversarialWarmup`; the discriminator still trains, so it is not starting from
scratch when the gate opens).

**Training step.** Two optimizers (the generator's is the one the train stage compiles,
the discriminator's a copy with its own optional learning rate, as for the GANs: see
:mod:`dlpipe.models.adversarial`), one discriminator update then one generator update
per batch. The upscaled batch is computed once, under the generator's tape; the
discriminator step uses it with ``stop_gradient``, and the generator step then scores
it with the updated discriminator.

Everything else (the degradation, ``model(hr)`` returning a same-shape reconstruction,
PSNR/SSIM/bicubic metrics, saving) is :class:`dlpipe.models.espcn.model.SuperResolution`;
the comparison grids are :mod:`dlpipe.models.espcn.plots`'.
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
from dlpipe.models.adversarial import bce_from_logits, clone_optimizer, loss_scaled, set_adam_betas
from dlpipe.models.common import apply_gradients, replica_scaled
from dlpipe.models.espcn.model import SubPixelUpsampling, SuperResolution, check_data
from dlpipe.models.espcn.model import callbacks as grid_callbacks
from dlpipe.models.grids import value_range_of
from dlpipe.models.srgan import SRGANParams


@keras.saving.register_keras_serializable(package="dlpipe")
class SRGAN(SuperResolution):
    """A super-resolution generator trained with content + adversarial losses.

    :param upscaler: the generator, low-res -> high-res.
    :param discriminator: high-res image -> one float32 logit.
    :param d_learning_rate: the discriminator's rate; ``None`` copies the generator's.
    :param adam_betas: ``(beta_1, beta_2)`` for both optimizers when Adam-family;
        ``None`` keeps the compiled optimizer's.
    :param pretrain_epochs: epochs of content-only generator training first.

    See :class:`SuperResolution` for the other parameters.
    """

    LOSS_TERMS = ("content", "adversarial")
    INITIAL_TERM_WEIGHTS = {"adversarial": 1e-3}

    def __init__(
        self,
        upscaler: keras.Model,
        discriminator: keras.Model,
        d_learning_rate: float | None = None,
        adam_betas: Sequence[float] | None = None,
        pretrain_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(upscaler, **kwargs)
        self.discriminator = discriminator
        self.d_learning_rate = d_learning_rate
        self.adam_betas = None if adam_betas is None else [float(b) for b in adam_betas]
        self.pretrain_epochs = int(pretrain_epochs)
        # 0 while the generator pretrains on the content loss alone, then 1.
        self.adversarial_gate = keras.Variable(
            0.0 if self.pretrain_epochs > 0 else 1.0,
            dtype="float32",
            trainable=False,
            name="adversarial_gate",
        )
        self.d_optimizer: Any = None

    def tracked_names(self) -> tuple[str, ...]:
        return ("content_loss", "adversarial_loss", "d_loss", "real_score", "fake_score")

    # --- optimizers ------------------------------------------------------------------

    def compile(self, optimizer: Any = "adam", d_optimizer: Any = None, **kwargs: Any) -> None:
        """``optimizer`` trains the generator; ``d_optimizer`` (default: a copy of it with
        ``d_learning_rate``) the discriminator. Call it inside the strategy scope."""
        super().compile(optimizer=optimizer, **kwargs)
        if self.adam_betas is not None:
            set_adam_betas(self.optimizer, self.adam_betas)
        if d_optimizer is None:
            d_optimizer = clone_optimizer(self.optimizer, self.d_learning_rate)
        else:
            d_optimizer = keras.optimizers.get(d_optimizer)
        # Under mixed_float16 Keras wraps ``optimizer`` in a LossScaleOptimizer (and
        # clone_optimizer keeps that); an explicit d_optimizer needs the same wrapping.
        self.d_optimizer = loss_scaled(d_optimizer, self.dtype_policy)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    # --- losses ----------------------------------------------------------------------

    def discriminate(self, images: Any, training: bool | None = False) -> Any:
        """The discriminator's float32 logits ``(n, 1)`` for high-res ``images``."""
        return ops.cast(self.discriminator(images, training=training), "float32")

    def discriminator_loss(self, hr: Any, sr: Any, training: bool = True) -> tuple[Any, Any, Any]:
        """``(d_loss, real_logits, fake_logits)``; ``sr`` is not differentiated."""
        real_logits = self.discriminate(hr, training=training)
        fake_logits = self.discriminate(ops.stop_gradient(sr), training=training)
        d_loss = 0.5 * (
            bce_from_logits(ops.ones_like(real_logits), real_logits)
            + bce_from_logits(ops.zeros_like(fake_logits), fake_logits)
        )
        return d_loss, real_logits, fake_logits

    def generator_loss(self, hr: Any, sr: Any, training: bool = True) -> tuple[Any, Any, Any]:
        """``(weighted total, content, adversarial)`` of the generator (float32)."""
        content = self.content_loss(sr, hr)
        logits = self.discriminate(sr, training=training)
        adversarial = bce_from_logits(ops.ones_like(logits), logits)
        total = (
            self.loss_weights["content"] * content
            + self.adversarial_gate * self.loss_weights["adversarial"] * adversarial
        )
        return total, content, adversarial

    def train_step(self, data: Any) -> dict[str, Any]:
        hr, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        hr = ops.cast(hr, "float32")
        lr = self.downsample(hr)
        with tf.GradientTape() as g_tape:
            sr = self.upscale(lr, training=True)
        # 1) the discriminator, on real images and on the (fixed) upscaled batch
        with tf.GradientTape() as d_tape:
            d_loss, real_logits, fake_logits = self.discriminator_loss(hr, sr)
            scaled = replica_scaled(d_loss)  # inside the tape, or it is not recorded
        apply_gradients(self.d_optimizer, d_tape, scaled, self.discriminator.trainable_variables)
        # 2) the generator, scored by the updated discriminator (same tape as sr)
        with g_tape:
            total, content, adversarial = self.generator_loss(hr, sr)
            scaled = replica_scaled(total)
        apply_gradients(self.optimizer, g_tape, scaled, self.upscaler.trainable_variables)
        sr_psnr, _ = self.quality(sr, hr)
        return self.track(
            self.scores(total, content, adversarial, d_loss, real_logits, fake_logits)
            | {"psnr": sr_psnr}
        )

    def test_step(self, data: Any) -> dict[str, Any]:
        hr, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        hr = ops.cast(hr, "float32")
        lr = self.downsample(hr)
        sr = self.upscale(lr, training=False)
        d_loss, real_logits, fake_logits = self.discriminator_loss(hr, sr, training=False)
        total, content, adversarial = self.generator_loss(hr, sr, training=False)
        values = self.scores(total, content, adversarial, d_loss, real_logits, fake_logits)
        return self.track(values | self.evaluation_metrics(hr, sr, lr))

    @staticmethod
    def scores(
        total: Any, content: Any, adversarial: Any, d_loss: Any, real_logits: Any, fake_logits: Any
    ) -> dict[str, Any]:
        return {
            "loss": total,
            "content_loss": content,
            "adversarial_loss": adversarial,
            "d_loss": d_loss,
            "real_score": ops.mean(ops.sigmoid(real_logits)),
            "fake_score": ops.mean(ops.sigmoid(fake_logits)),
        }

    # --- serialization ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "d_learning_rate": self.d_learning_rate,
            "adam_betas": self.adam_betas,
            "pretrain_epochs": self.pretrain_epochs,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        upscaler = keras.saving.deserialize_keras_object(config.pop("upscaler"))
        discriminator = keras.saving.deserialize_keras_object(config.pop("discriminator"))
        return cls(upscaler, discriminator, **config)


class AdversarialWarmup(keras.callbacks.Callback):
    """Opens ``model.adversarial_gate`` once ``epochs`` epochs of pretraining are done."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.model.adversarial_gate.assign(1.0 if epoch >= self.epochs else 0.0)


# --------------------------------------------------------------------------------------
# Networks from the plugin's params
# --------------------------------------------------------------------------------------


def build_generator(
    channels: int, scale: int, filters: int, blocks: int, batchnorm: bool = False
) -> keras.Model:
    """The SRResNet generator, ``(h, w, channels) -> (h * scale, w * scale, channels)``."""
    steps = int(round(math.log2(scale)))
    if 2**steps != scale:
        raise ValueError(f"srgan: scale must be a power of 2, not {scale}")

    def conv(h: Any, f: int, k: int, name: str) -> Any:
        return layers.Conv2D(f, k, padding="same", use_bias=not batchnorm, name=name)(h)

    def norm(h: Any, name: str) -> Any:
        return layers.BatchNormalization(name=name)(h) if batchnorm else h

    lr = keras.Input(shape=(None, None, channels), name="low_res")
    h = layers.Conv2D(filters, 9, padding="same", name="head")(lr)
    h = layers.PReLU(shared_axes=[1, 2], name="head_act")(h)
    trunk = h
    for i in range(blocks):
        r = norm(conv(h, filters, 3, f"block_{i}_conv_a"), f"block_{i}_bn_a")
        r = layers.PReLU(shared_axes=[1, 2], name=f"block_{i}_act")(r)
        r = norm(conv(r, filters, 3, f"block_{i}_conv_b"), f"block_{i}_bn_b")
        h = layers.Add(name=f"block_{i}_add")([h, r])
    h = norm(conv(h, filters, 3, "trunk_conv"), "trunk_bn")
    h = layers.Add(name="long_skip")([trunk, h])
    for i in range(steps):
        h = layers.Conv2D(4 * filters, 3, padding="same", name=f"up_{i}_conv")(h)
        h = SubPixelUpsampling(2, name=f"up_{i}_shuffle")(h)
        h = layers.PReLU(shared_axes=[1, 2], name=f"up_{i}_act")(h)
    hr = layers.Conv2D(channels, 9, padding="same", dtype="float32", name="high_res")(h)
    return keras.Model(lr, hr, name="generator")


def build_discriminator(
    input_shape: tuple[int, int, int], filters: Sequence[int], dense: int
) -> keras.Model:
    """High-res image -> one float32 logit (real vs upscaled)."""
    image = keras.Input(shape=input_shape, name="image")
    h = image
    for i, f in enumerate(filters):
        h = layers.Conv2D(f, 3, padding="same", name=f"conv_{i}")(h)
        h = layers.LeakyReLU(0.2, name=f"conv_{i}_act")(h)
        h = layers.Conv2D(f, 3, strides=2, padding="same", name=f"down_{i}")(h)
        h = layers.LeakyReLU(0.2, name=f"down_{i}_act")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.LeakyReLU(0.2, name="dense_act")(layers.Dense(dense, name="dense")(h))
    logit = layers.Dense(1, dtype="float32", name="logit")(h)
    return keras.Model(image, logit, name="discriminator")


def build(params: SRGANParams, data: DataBundle) -> SRGAN:
    """The ``srgan`` builder: a built, uncompiled :class:`SRGAN` model."""
    height, width, channels = check_data(data, params.scale, "srgan")
    if not params.d_filters:
        raise ConfigError("srgan: 'd_filters' must list at least one filter count")
    generator = build_generator(
        channels, params.scale, params.filters, params.residual_blocks, params.batchnorm
    )
    discriminator = build_discriminator(
        (height, width, channels), list(params.d_filters), params.d_dense
    )
    model = SRGAN(
        generator,
        discriminator,
        d_learning_rate=params.d_learning_rate,
        adam_betas=params.adam_betas,
        pretrain_epochs=params.pretrain_epochs,
        scale=params.scale,
        value_range=value_range_of(data),
        degradation=params.degradation,
        sample_every=params.sample_every,
        name="srgan",
    )
    model(np.zeros((1, height, width, channels), dtype="float32"))
    return model


def callbacks(context: Any, model: SRGAN, data: DataBundle) -> list[Any]:
    """The registered callback hook: the comparison grid every ``sample_every`` epochs,
    and the adversarial warm-up gate when ``pretrain_epochs > 0``."""
    found = grid_callbacks(context, model, data)
    if model.pretrain_epochs > 0:
        found.append(AdversarialWarmup(model.pretrain_epochs))
    return found
