"""ESPCN: single-image super-resolution with a sub-pixel convolution (``espcn``).

In the spirit of the keras-io example ``vision/super_resolution_sub_pixel.py`` (Shi et
al. 2016, "Real-Time Single Image and Video Super-Resolution Using an Efficient
Sub-Pixel Convolutional Neural Network"). All convolutions run at the LOW resolution;
only the last one widens to ``channels * r**2`` feature maps, which
:func:`depth_to_space` rearranges into an image ``r`` times larger on each side::

    low-res (h, w, c)
      -> Conv 5x5, 64, tanh -> Conv 3x3, 32, tanh     (feature extraction, at h x w)
      -> Conv 3x3, c * r^2                            (one sub-pixel per output offset)
      -> depth_to_space(r)                            (rh, rw, c)

**What the data holds and what the model sees.** The data stage stays an ordinary
image stage: the bundle holds the HIGH-resolution images (digits resized to 32x32, for
example) and nothing else. The model makes its own low-resolution input by downsampling
the batch by ``scale`` (``degradation``: ``area`` = mean of each ``r x r`` block, or
antialiased ``bilinear``) inside ``train_step``/``test_step``, and learns to undo it.

**Why ``model(hr)`` returns an image of the same shape.** dlpipe's ``generative`` task
expects ``model.predict(x)`` to be shaped like ``x`` (the conformance test checks it),
and the evaluate stage feeds the model the same high-resolution images it trained on.
So :meth:`SuperResolution.call` takes a high-resolution batch, downsamples it and
upscales it again: it returns the model's reconstruction of ``x`` from its low-res
version, directly comparable with ``x``. For genuinely low-resolution images call
:meth:`SuperResolution.upscale` (the network is fully convolutional: any size works).

**Loss and metrics.** The loss is the pixel mean squared error between the upscaled
image and the original, the named loss term ``content`` (``train.loss_weights.content``).
Each epoch reports ``loss`` and ``psnr`` (training) and, on validation data,
``val_psnr``/``val_ssim`` next to ``val_bicubic_psnr``/``val_bicubic_ssim``: the same
metrics for plain bicubic interpolation of the same low-res input, the baseline a
super-resolution model has to beat. Metrics are computed on outputs clipped to the
data's value range (:mod:`dlpipe.models.image_quality`).

**Artifacts.** A grid with rows low-res / bicubic / model / ground truth is logged
every ``sample_every`` epochs (``samples/superres_epoch_NNN.png``, :func:`callbacks`)
and after training by :func:`dlpipe.models.espcn.plots.plots` (``plots/superres.png``,
plus a histogram of the per-image PSNR gain over bicubic, ``plots/psnr_gain.png``).

:class:`SuperResolution` holds what every super-resolution model here shares (the
degradation, bicubic baseline, metrics, grids, saving); :mod:`dlpipe.models.srgan.model`
builds its adversarial variant on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models import grids
from dlpipe.models.common import apply_gradients, make_loss_weights, replica_scaled
from dlpipe.models.espcn import ESPCNParams
from dlpipe.models.espcn.plots import comparison_figure, grid_images
from dlpipe.models.grids import value_range_of
from dlpipe.models.image_quality import psnr, ssim, to_unit_range

# --------------------------------------------------------------------------------------
# Sub-pixel upsampling
# --------------------------------------------------------------------------------------


def depth_to_space(x: Any, block: int) -> Any:
    """``(n, h, w, c * block**2)`` -> ``(n, h * block, w * block, c)``.

    The channel axis is read as ``(row offset i, column offset j, channel)``: output
    pixel ``(h * block + i, w * block + j)`` of channel ``k`` is input channel
    ``(i * block + j) * c + k`` at ``(h, w)``. This is TensorFlow's ``depth_to_space``
    (NHWC, "DCR") ordering, written with a reshape and a transpose.
    """
    block = int(block)
    shape = ops.shape(x)
    n, h, w, depth = shape[0], shape[1], shape[2], shape[3]
    if isinstance(depth, int) and depth % (block * block):
        raise ValueError(f"depth_to_space: {depth} channels do not divide by {block}**2")
    c = depth // (block * block)
    x = ops.reshape(x, (n, h, w, block, block, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (n, h, i, w, j, c)
    return ops.reshape(x, (n, h * block, w * block, c))


@keras.saving.register_keras_serializable(package="dlpipe")
class SubPixelUpsampling(layers.Layer):
    """A layer around :func:`depth_to_space` (no weights)."""

    def __init__(self, block_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_size = int(block_size)

    def call(self, inputs: Any) -> Any:
        return depth_to_space(inputs, self.block_size)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        n, h, w, c = input_shape
        r = self.block_size

        def up(d: Any) -> Any:
            return None if d is None else d * r

        return (n, up(h), up(w), None if c is None else c // (r * r))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "block_size": self.block_size}


# --------------------------------------------------------------------------------------
# What every super-resolution model here shares
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class SuperResolution(keras.Model):
    """An ``upscaler`` network (low-res -> high-res) trained on downsampled images.

    :param upscaler: a fully convolutional model ``(h, w, c) -> (h * scale, w * scale, c)``.
    :param scale: the upscaling factor ``r``.
    :param value_range: the data's ``(low, high)``; outputs are clipped to it for
        metrics and plots, and ``high - low`` is the PSNR/SSIM ``max_val``.
    :param degradation: how low-res inputs are made: ``area`` (block mean) or
        ``bilinear`` (antialiased resize).
    :param sample_every: log a low-res/bicubic/model/truth grid every N epochs (0: never).

    Compile with an optimizer only: the loss is built in (term ``content``).
    """

    LOSS_TERMS: tuple[str, ...] = ("content",)
    INITIAL_TERM_WEIGHTS: dict[str, float] = {}

    def __init__(
        self,
        upscaler: keras.Model,
        scale: int,
        value_range: Sequence[float] = (0.0, 1.0),
        degradation: str = "area",
        sample_every: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if degradation not in ("area", "bilinear"):
            raise ValueError(f"degradation must be 'area' or 'bilinear', not {degradation!r}")
        self.upscaler = upscaler
        self.scale = int(scale)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.degradation = degradation
        self.sample_every = int(sample_every)
        self.loss_weights = make_loss_weights(self.LOSS_TERMS, self.INITIAL_TERM_WEIGHTS)
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", *self.tracked_names(), "psnr", "ssim")
            + ("bicubic_psnr", "bicubic_ssim")
        }

    def tracked_names(self) -> tuple[str, ...]:
        """Extra per-epoch means a subclass reports (besides loss, psnr, ssim, bicubic)."""
        return ()

    @property
    def metrics(self) -> list[Any]:
        # Listed here so Keras resets them at the start of each epoch.
        return list(self.trackers.values())

    # --- optimizers ------------------------------------------------------------------

    def compile(self, optimizer: Any = "adam", **kwargs: Any) -> None:
        super().compile(optimizer=optimizer, **kwargs)
        # Built here (inside the strategy scope) for the upscaler's variables only, so
        # that a loaded model's optimizer matches the saved one variable for variable.
        self.optimizer.build(self.upscaler.trainable_variables)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras skips compile() on load when it is overridden; this restores the
        # optimizer(s) so their saved state can be loaded into them.
        self.compile(**keras.saving.deserialize_keras_object(config))

    # --- degradation, upscaling, baseline ------------------------------------------------

    def downsample(self, hr: Any) -> Any:
        """The low-resolution version of a high-resolution batch (sides / ``scale``)."""
        hr = ops.cast(hr, "float32")
        r = self.scale
        if self.degradation == "area":
            return ops.average_pool(hr, pool_size=r, strides=r, padding="valid")
        shape = ops.shape(hr)
        size = (shape[1] // r, shape[2] // r)
        return ops.image.resize(hr, size, interpolation="bilinear", antialias=True)

    def upscale(self, lr: Any, training: bool | None = False) -> Any:
        """The network's high-resolution float32 output for a low-resolution batch."""
        return ops.cast(self.upscaler(ops.convert_to_tensor(lr), training=training), "float32")

    def bicubic(self, lr: Any) -> Any:
        """The baseline: bicubic interpolation of ``lr`` by ``scale``, clipped to range."""
        lr = ops.cast(ops.convert_to_tensor(lr), "float32")
        shape = ops.shape(lr)
        size = (shape[1] * self.scale, shape[2] * self.scale)
        up = ops.image.resize(lr, size, interpolation="bicubic")
        return ops.clip(up, *self.value_range)

    def build(self, input_shape: Any = None) -> None:
        # The upscaler is a built functional model.
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """High-res ``inputs`` -> the model's reconstruction of them from low-res."""
        return self.upscale(self.downsample(inputs), training=training)

    # --- metrics ---------------------------------------------------------------------

    def quality(self, images: Any, reference: Any) -> tuple[Any, Any]:
        """Per-image ``(psnr, ssim)`` of ``images`` (clipped to range) vs ``reference``."""
        a, max_val = to_unit_range(images, self.value_range)
        b, _ = to_unit_range(reference, self.value_range)
        return psnr(a, b, max_val), ssim(a, b, max_val)

    def track(self, values: dict[str, Any]) -> dict[str, Any]:
        """Update the named trackers and return the results of those named."""
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: self.trackers[name].result() for name in values}

    def evaluation_metrics(self, hr: Any, sr: Any, lr: Any) -> dict[str, Any]:
        """PSNR/SSIM of the model's output and of bicubic interpolation."""
        sr_psnr, sr_ssim = self.quality(sr, hr)
        bic_psnr, bic_ssim = self.quality(self.bicubic(lr), hr)
        return {
            "psnr": sr_psnr,
            "ssim": sr_ssim,
            "bicubic_psnr": bic_psnr,
            "bicubic_ssim": bic_ssim,
        }

    # --- training --------------------------------------------------------------------

    def content_loss(self, sr: Any, hr: Any) -> Any:
        """Pixel mean squared error (float32)."""
        return ops.mean(ops.square(sr - ops.cast(hr, "float32")))

    def train_step(self, data: Any) -> dict[str, Any]:
        hr, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        lr = self.downsample(hr)
        with tf.GradientTape() as tape:
            sr = self.upscale(lr, training=True)
            loss = self.loss_weights["content"] * self.content_loss(sr, hr)
            scaled = replica_scaled(loss)  # inside the tape, or no gradient reaches it
        apply_gradients(self.optimizer, tape, scaled, self.upscaler.trainable_variables)
        sr_psnr, _ = self.quality(sr, hr)
        return self.track({"loss": loss, "psnr": sr_psnr})

    def test_step(self, data: Any) -> dict[str, Any]:
        hr, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        lr = self.downsample(hr)
        sr = self.upscale(lr, training=False)
        loss = self.loss_weights["content"] * self.content_loss(sr, hr)
        return self.track({"loss": loss, **self.evaluation_metrics(hr, sr, lr)})

    # --- serialization ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "upscaler": keras.saving.serialize_keras_object(self.upscaler),
            "scale": self.scale,
            "value_range": list(self.value_range),
            "degradation": self.degradation,
            "sample_every": self.sample_every,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        upscaler = keras.saving.deserialize_keras_object(config.pop("upscaler"))
        return cls(upscaler, **config)


# --------------------------------------------------------------------------------------
# The ESPCN network
# --------------------------------------------------------------------------------------


def build_espcn_network(
    channels: int,
    scale: int,
    filters: Sequence[int],
    kernel_sizes: Sequence[int],
    activation: str = "tanh",
) -> keras.Model:
    """``(h, w, channels) -> (h * scale, w * scale, channels)``, fully convolutional.

    One ``Conv2D`` per entry of ``filters`` (with the matching ``kernel_sizes``), then
    a 3x3 convolution to ``channels * scale**2`` maps and :class:`SubPixelUpsampling`.
    """
    if len(kernel_sizes) != len(filters):
        raise ValueError(
            f"espcn: {len(filters)} filters but {len(kernel_sizes)} kernel_sizes; "
            "give one kernel size per convolution"
        )
    lr = keras.Input(shape=(None, None, channels), name="low_res")
    h = lr
    for i, (f, k) in enumerate(zip(filters, kernel_sizes, strict=True)):
        h = layers.Conv2D(
            f,
            k,
            padding="same",
            activation=activation,
            kernel_initializer="orthogonal",
            name=f"conv_{i}",
        )(h)
    h = layers.Conv2D(
        channels * scale * scale,
        3,
        padding="same",
        kernel_initializer="orthogonal",
        name="sub_pixel_conv",
    )(h)
    hr = SubPixelUpsampling(scale, dtype="float32", name="depth_to_space")(h)
    return keras.Model(lr, hr, name="espcn_network")


def check_data(data: DataBundle, scale: int, arch: str) -> tuple[int, int, int]:
    """The data's image shape, with clear errors when ``scale`` cannot divide it."""
    shape = tuple(data.input_shape)
    if len(shape) != 3:
        raise ConfigError(f"{arch}: needs images (height, width, channels), got shape {shape}")
    height, width, channels = (int(d) for d in shape)
    if height % scale or width % scale:
        raise ConfigError(
            f"{arch}: image sides {height}x{width} must divide by scale {scale}; resize the "
            f"images (data param image_size, e.g. [32, 32])"
        )
    return height, width, channels


def build(params: ESPCNParams, data: DataBundle) -> SuperResolution:
    """The ``espcn`` builder: a built, uncompiled :class:`SuperResolution` model."""
    height, width, channels = check_data(data, params.scale, "espcn")
    network = build_espcn_network(
        channels, params.scale, list(params.filters), list(params.kernel_sizes), params.activation
    )
    model = SuperResolution(
        network,
        scale=params.scale,
        value_range=value_range_of(data),
        degradation=params.degradation,
        sample_every=params.sample_every,
        name="espcn",
    )
    model(np.zeros((1, height, width, channels), dtype="float32"))
    return model


# --------------------------------------------------------------------------------------
# The comparison grid during training (the figures after it are in espcn.plots)
# --------------------------------------------------------------------------------------


def callbacks(context: Any, model: SuperResolution, data: DataBundle) -> list[Any]:
    """The registered callback hook: the comparison grid of fixed images every
    ``sample_every`` epochs, as ``samples/superres_epoch_NNN.png``."""
    if model.sample_every <= 0:
        return []
    images = grid_images(data)
    return [
        grids.epoch_figure_callback(
            context,
            model.sample_every,
            lambda done: comparison_figure(model, images, f"epoch {done}"),
            name="superres",
        )
    ]
