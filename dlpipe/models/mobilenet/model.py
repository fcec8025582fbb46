"""A MobileNet (Howard et al., 2017) for the ``mobilenet`` architecture.

MobileNet replaces each standard convolution by a *depthwise separable* one: a 3x3
depthwise convolution filters every channel on its own, then a 1x1 *pointwise*
convolution mixes the channels. For ``c`` input and ``f`` output channels that costs
``9c + cf`` weights instead of ``9cf``, 8-9x less. Each of the two is followed by
batch normalization and ReLU6.

The network is a 3x3 stride-2 stem with 32 filters, then 13 separable blocks

    64, 128/2, 128, 256/2, 256, 512/2, 5 x 512, 1024/2, 1024     (filters/stride)

then global average pooling, dropout and a softmax. Options:

* ``width`` (the paper's width multiplier alpha) scales every filter count;
* ``output_stride`` (8, 16 or 32) turns on *dilated* (atrous) convolutions: once the
  network has downsampled by ``output_stride``, further stride-2 blocks keep the
  resolution and double their depthwise dilation rate instead, which keeps the
  receptive field growing (the DeepLab recipe for dense prediction);
* ``groups`` makes the pointwise convolutions *grouped* (``Conv2D(groups=g)``, each
  output channel sees ``1/g`` of the inputs, ``g`` times fewer weights) followed by a
  channel shuffle so information still crosses groups (as in ShuffleNet). Filter
  counts are rounded to multiples of ``groups``.

Small inputs: the stem has stride 1 for images below 64x64 (``stem_stride: auto``) and a
block only downsamples while its input is at least 2x2, so 8x8 digits work.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.models.common import BN_MOMENTUM, image_classifier_inputs
from dlpipe.models.mobilenet import MobileNetParams

#: (pointwise filters, stride) of the 13 separable blocks.
BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def channels(n: int, width: float, groups: int) -> int:
    """``n * width`` rounded to a positive multiple of ``groups``."""
    return max(groups, int(round(n * width / groups)) * groups)


def channel_shuffle(h: Any, groups: int, name: str) -> Any:
    """Interleave the channels of ``groups`` groups: (g, c/g) -> (c/g, g)."""
    height, width, c = h.shape[1:]
    h = layers.Reshape((height, width, groups, c // groups), name=f"{name}_split")(h)
    h = layers.Permute((1, 2, 4, 3), name=f"{name}_swap")(h)
    return layers.Reshape((height, width, c), name=f"{name}_merge")(h)


def separable_block(
    h: Any, filters: int, strides: int, dilation: int, groups: int, name: str
) -> Any:
    h = layers.DepthwiseConv2D(
        3, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
        name=f"{name}_dw",
    )(h)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_dw_bn")(h)
    h = layers.ReLU(6.0, name=f"{name}_dw_relu")(h)
    h = layers.Conv2D(filters, 1, groups=groups, use_bias=False, name=f"{name}_pw")(h)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_pw_bn")(h)
    h = layers.ReLU(6.0, name=f"{name}_pw_relu")(h)
    if groups > 1:
        h = channel_shuffle(h, groups, f"{name}_shuffle")
    return h


def stem_stride(params: MobileNetParams, input_shape: tuple[int, ...]) -> int:
    if params.stem_stride != "auto":
        return int(params.stem_stride)
    return 2 if min(input_shape[:2]) >= 64 else 1


def build(params: MobileNetParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled MobileNet classifier for ``data``."""
    input_shape, classes = image_classifier_inputs("mobilenet", data)
    groups = int(params.groups)

    inputs = keras.Input(shape=input_shape, name="x")
    strides = stem_stride(params, input_shape)
    h = layers.Conv2D(
        channels(32, params.width, groups), 3, strides=strides, padding="same",
        use_bias=False, name="stem_conv",
    )(inputs)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(h)
    h = layers.ReLU(6.0, name="stem_relu")(h)

    current_stride, dilation = strides, 1
    for i, (filters, stride) in enumerate(BLOCKS, start=1):
        if stride == 2 and params.output_stride and current_stride >= params.output_stride:
            stride, dilation = 1, dilation * 2  # keep the resolution, widen the view
        elif stride == 2 and min(h.shape[1:3]) < 2:
            stride = 1  # nothing left to downsample
        current_stride *= stride
        h = separable_block(
            h, channels(filters, params.width, groups), stride, dilation, groups, f"block{i}"
        )
    h = layers.GlobalAveragePooling2D(name="avg_pool")(h)
    if params.dropout > 0:
        h = layers.Dropout(params.dropout, name="dropout")(h)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name="mobilenet")
