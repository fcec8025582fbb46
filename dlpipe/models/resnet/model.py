"""Residual networks (He et al., 2016) for the ``resnet`` architecture.

A residual block learns a correction ``F(x)`` to its input and adds the input back,
``y = relu(F(x) + shortcut(x))``. The identity shortcut lets gradients reach early
layers unchanged, which is what makes networks of 50 and more layers trainable. The
shortcut is a 1x1 convolution (with batch normalization) only where the block changes
the number of channels or the resolution.

Two block types:

* **basic** (ResNet-18/34): two 3x3 convolutions;
* **bottleneck** (ResNet-50/101/152): 1x1 to reduce the channels, 3x3, and 1x1 to
  expand them 4x again; the stride sits on the 3x3 convolution (as in torchvision's
  "ResNet v1.5").

Four stages of blocks with 64, 128, 256 and 512 base filters (times ``width``), the
first block of stages 2-4 halving the resolution, then global average pooling and a
softmax. Convolutions have no bias (batch normalization follows each). ResNet-50 at
224x224x3 with 1000 classes has the published 25,557,032 trainable parameters (Keras
also counts the 53,120 moving statistics of its batch normalization layers).

The stem: ``imagenet`` is the paper's 7x7 stride-2 convolution and 3x3 stride-2 max
pooling; ``small`` a single 3x3 stride-1 convolution (the CIFAR-style stem, for images
of 32x32 and smaller); ``auto`` picks ``imagenet`` from 64x64 up. A block only
downsamples while the map is at least 2x2, so 8x8 digits work with either stem.
``zero_init_residual`` starts the last batch normalization of each block at zero, so
every block starts as the identity (Goyal et al., 2017).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.models.common import BN_MOMENTUM, image_classifier_inputs, scaled, stem_kind
from dlpipe.models.resnet import ResNetParams

#: (block type, blocks per stage) for each depth.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
FILTERS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
BN_EPSILON = 1e-5


def conv_bn(
    h: Any, filters: int, kernel: int, strides: int, name: str, relu: bool = True, zero_gamma: bool = False
) -> Any:
    h = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(h)
    h = layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{name}_bn",
    )(h)
    return layers.ReLU(name=f"{name}_relu")(h) if relu else h


def shortcut(h: Any, channels: int, strides: int, name: str) -> Any:
    """Identity, or a 1x1 projection when the channels or the resolution change."""
    if strides == 1 and h.shape[-1] == channels:
        return h
    return conv_bn(h, channels, 1, strides, f"{name}_proj", relu=False)


def basic_block(h: Any, filters: int, strides: int, zero_init: bool, name: str) -> Any:
    skip = shortcut(h, filters, strides, name)
    r = conv_bn(h, filters, 3, strides, f"{name}_1")
    r = conv_bn(r, filters, 3, 1, f"{name}_2", relu=False, zero_gamma=zero_init)
    h = layers.Add(name=f"{name}_add")([skip, r])
    return layers.ReLU(name=f"{name}_out")(h)


def bottleneck_block(h: Any, filters: int, strides: int, zero_init: bool, name: str) -> Any:
    skip = shortcut(h, filters * EXPANSION["bottleneck"], strides, name)
    r = conv_bn(h, filters, 1, 1, f"{name}_1")
    r = conv_bn(r, filters, 3, strides, f"{name}_2")
    r = conv_bn(
        r, filters * EXPANSION["bottleneck"], 1, 1, f"{name}_3", relu=False, zero_gamma=zero_init
    )
    h = layers.Add(name=f"{name}_add")([skip, r])
    return layers.ReLU(name=f"{name}_out")(h)


def build(params: ResNetParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled ResNet-``depth`` classifier for ``data``."""
    input_shape, classes = image_classifier_inputs("resnet", data)
    kind, blocks = DEPTHS[params.depth]
    block = basic_block if kind == "basic" else bottleneck_block
    stem_filters = scaled(64, params.width)

    inputs = keras.Input(shape=input_shape, name="x")
    if stem_kind(params.stem, input_shape) == "imagenet":
        h = conv_bn(inputs, stem_filters, 7, 2, "stem")
        if min(h.shape[1:3]) >= 2:
            h = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(h)
    else:
        h = conv_bn(inputs, stem_filters, 3, 1, "stem")

    for s, (count, filters) in enumerate(zip(blocks, FILTERS, strict=True), start=1):
        for b in range(1, count + 1):
            downsample = s > 1 and b == 1 and min(h.shape[1:3]) >= 2
            h = block(
                h, scaled(filters, params.width), 2 if downsample else 1,
                params.zero_init_residual, f"stage{s}_block{b}",
            )
    h = layers.GlobalAveragePooling2D(name="avg_pool")(h)
    if params.dropout > 0:
        h = layers.Dropout(params.dropout, name="dropout")(h)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name=f"resnet{params.depth}")
