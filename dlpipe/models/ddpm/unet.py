"""The noise-prediction U-Net of ``ddpm``, and the time/label embedding that
``latent_diffusion``'s denoiser shares.

Residual blocks of GroupNorm -> swish -> 3x3 convolution, one resolution level per
entry of ``widths`` (stride-2 convolutions down, nearest upsampling up, skip
connections across). A sinusoidal embedding of ``t`` conditions every residual block
as a per-channel scale and shift after its second normalization (:class:`ScaleShift`).
A class-conditional network adds a learned label embedding to the time embedding, with
one extra "null" class for classifier-free guidance (:func:`conditioning_embedding`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops


def sinusoidal_embedding(t: Any, dim: int, max_period: float = 10000.0) -> Any:
    """``(batch,)`` timesteps -> ``(batch, dim)`` features ``[sin(t f_i), cos(t f_i)]``
    with frequencies ``f_i = max_period ** (-i / (dim / 2))``, ``i = 0 .. dim/2 - 1``
    (the Transformer's position encoding, applied to the diffusion step)."""
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(half, dtype="float32") / float(half))
    angles = ops.cast(ops.reshape(t, (-1, 1)), "float32") * ops.reshape(freqs, (1, half))
    return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


@keras.saving.register_keras_serializable(package="dlpipe")
class SinusoidalEmbedding(layers.Layer):
    """Layer form of :func:`sinusoidal_embedding`: ``(batch, 1)`` int steps -> ``(batch, dim)``.

    Computed in float32 whatever the dtype policy (large angles lose precision in
    float16).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if dim < 2 or dim % 2:
            raise ValueError(f"the embedding size must be even and >= 2, not {dim}")
        self.dim = int(dim)
        self.max_period = float(max_period)

    def call(self, t: Any) -> Any:
        return sinusoidal_embedding(t, self.dim, self.max_period)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim, "max_period": self.max_period}


def group_norm(channels: int, name: str) -> layers.Layer:
    """GroupNorm with up to 8 groups (as many as divide ``channels``)."""
    return layers.GroupNormalization(groups=math.gcd(int(channels), 8), name=name)


@keras.saving.register_keras_serializable(package="dlpipe")
class ScaleShift(layers.Layer):
    """``h * (1 + scale) + shift`` with ``[scale, shift]`` per example and channel.

    Called on ``[h, params]`` with ``params`` of shape ``(batch, 2 * channels)``; the
    conditioning of a residual block, applied right after its normalization (a plain
    added bias before a GroupNorm of one channel per group would be normalized away).
    """

    def call(self, inputs: Any) -> Any:
        h, params = inputs
        channels = h.shape[-1]
        params = ops.reshape(
            ops.cast(params, h.dtype), (-1,) + (1,) * (len(h.shape) - 2) + (2 * channels,)
        )
        scale, shift = params[..., :channels], params[..., channels:]
        return h * (1.0 + scale) + shift

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]


def residual_block(h: Any, emb: Any, width: int, name: str) -> Any:
    """GroupNorm -> swish -> conv, GroupNorm -> scale/shift by the embedding -> swish ->
    conv, added to a (1x1-projected) skip."""
    skip = h if h.shape[-1] == width else layers.Conv2D(width, 1, name=f"{name}_skip")(h)
    h = group_norm(h.shape[-1], f"{name}_norm0")(h)
    h = layers.Conv2D(width, 3, padding="same", name=f"{name}_conv0")(
        layers.Activation("swish", name=f"{name}_act0")(h)
    )
    scale_shift = layers.Dense(2 * width, name=f"{name}_emb")(
        layers.Activation("swish", name=f"{name}_emb_act")(emb)
    )
    h = ScaleShift(name=f"{name}_condition")([group_norm(width, f"{name}_norm1")(h), scale_shift])
    h = layers.Conv2D(width, 3, padding="same", name=f"{name}_conv1")(
        layers.Activation("swish", name=f"{name}_act1")(h)
    )
    return layers.Add(name=f"{name}_out")([skip, h])


def conditioning_embedding(
    t: Any, label: Any, emb_dim: int, num_classes: int, sinusoid_dim: int
) -> Any:
    """Time embedding (sinusoid -> Dense -> swish -> Dense), plus a learned embedding of
    the label (``num_classes + 1`` entries: the last is the null class) when given."""
    emb = SinusoidalEmbedding(sinusoid_dim, name="time_sinusoid")(t)
    emb = layers.Dense(emb_dim, activation="swish", name="time_dense0")(emb)
    emb = layers.Dense(emb_dim, name="time_dense1")(emb)
    if label is not None:
        label_emb = layers.Embedding(num_classes + 1, emb_dim, name="label_embedding")(label)
        emb = layers.Add(name="time_plus_label")(
            [emb, layers.Flatten(name="label_flat")(label_emb)]
        )
    return emb


def build_unet(
    input_shape: Sequence[int],
    widths: Sequence[int],
    num_classes: int = 0,
    blocks_per_level: int = 1,
    emb_dim: int | None = None,
) -> keras.Model:
    """``[x_t, t]`` (+ ``label`` when ``num_classes``) -> predicted noise, float32.

    One level per entry of ``widths``; between levels a stride-2 convolution halves the
    resolution, so height and width must divide by ``2 ** (len(widths) - 1)``. The
    output convolution starts at zero (the first prediction is "no noise").
    """
    height, width, channels = (int(d) for d in input_shape)
    widths = [int(w) for w in widths]
    emb_dim = int(emb_dim or 4 * widths[0])
    x_t = keras.Input(shape=(height, width, channels), name="x_t")
    t = keras.Input(shape=(1,), dtype="int32", name="t")
    inputs = [x_t, t]
    label = None
    if num_classes:
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        inputs.append(label)
    sinusoid_dim = max(2, widths[0] - widths[0] % 2)
    emb = conditioning_embedding(t, label, emb_dim, num_classes, sinusoid_dim)

    h = layers.Conv2D(widths[0], 3, padding="same", name="stem")(x_t)
    skips = []
    for level, w in enumerate(widths):
        for b in range(blocks_per_level):
            h = residual_block(h, emb, w, f"down{level}_block{b}")
        skips.append(h)
        if level < len(widths) - 1:
            h = layers.Conv2D(w, 3, strides=2, padding="same", name=f"down{level}_downsample")(h)
    if len(widths) > 1:  # at the coarsest resolution, between the two paths
        h = residual_block(h, emb, widths[-1], "middle_block")
    for level in reversed(range(len(widths))):
        h = layers.Concatenate(name=f"up{level}_skip")([h, skips[level]])
        for b in range(blocks_per_level):
            h = residual_block(h, emb, widths[level], f"up{level}_block{b}")
        if level > 0:
            h = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(h)
            h = layers.Conv2D(widths[level - 1], 3, padding="same", name=f"up{level}_conv")(h)
    h = layers.Activation("swish", name="out_act")(group_norm(widths[0], "out_norm")(h))
    eps = layers.Conv2D(
        channels, 3, padding="same", kernel_initializer="zeros", dtype="float32", name="noise"
    )(h)
    return keras.Model(inputs, eps, name="unet")
