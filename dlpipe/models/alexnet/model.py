"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012), scaled down, for ``alexnet``.

The network that started the deep-learning wave in vision, on one device (the paper
split it over two GPUs) and with modern simplifications:

* five convolutions (96, 256, 384, 384, 256 filters) with ReLU;
* *overlapping* max pooling, 3x3 windows with stride 2, after convolutions 1, 2 and 5;
* two large fully connected layers (4096, 4096), each followed by dropout (0.5);
* a softmax over the classes.

Local response normalization is left out (later work found it does little);
``batch_norm: true`` adds batch normalization after each convolution instead.
``width`` multiplies every filter count and the dense widths, so ``width: 0.25`` is a
network a CPU trains in minutes.

The stem: ``imagenet`` is the paper's 11x11 convolution with stride 4 (for ~224x224
inputs); ``small`` is a 5x5 convolution with stride 1 for small images (CIFAR-style);
``auto`` picks ``imagenet`` from 64x64 up. A pooling layer is skipped when its input
is smaller than the 3x3 window, so even 8x8 digits work.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.alexnet import AlexNetParams
from dlpipe.models.common import BN_MOMENTUM, image_classifier_inputs, scaled, stem_kind

#: (filters, kernel size) of the five convolutions, and whether max pooling follows.
CONVS = ((96, 11, True), (256, 5, True), (384, 3, False), (384, 3, False), (256, 3, True))


def conv_block(h: Any, filters: int, kernel: int, strides: int, batch_norm: bool, name: str) -> Any:
    padding = "valid" if strides > 1 else "same"
    h = layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, use_bias=not batch_norm, name=name
    )(h)
    if batch_norm:
        h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(h)
    return layers.ReLU(name=f"{name}_relu")(h)


def overlapping_pool(h: Any, name: str) -> Any:
    """3x3 max pooling with stride 2, skipped when the map is smaller than 3x3."""
    if min(h.shape[1:3]) < 3:
        return h
    return layers.MaxPooling2D(pool_size=3, strides=2, name=name)(h)


def build(params: AlexNetParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled AlexNet-style classifier for ``data``."""
    input_shape, classes = image_classifier_inputs("alexnet", data)
    stem = stem_kind(params.stem, input_shape)
    if stem == "imagenet" and min(input_shape[:2]) < 11:
        raise DlpipeError(
            f"alexnet with stem 'imagenet' (an 11x11 stride-4 convolution) needs images of "
            f"at least 11x11, got {input_shape[0]}x{input_shape[1]}; set image_size: "
            "[64, 64] (or larger) in the data stage, or stem: small"
        )

    inputs = keras.Input(shape=input_shape, name="x")
    h = inputs
    for i, (filters, kernel, pool) in enumerate(CONVS, start=1):
        strides = 1
        if i == 1:
            kernel, strides = (11, 4) if stem == "imagenet" else (5, 1)
        h = conv_block(h, scaled(filters, params.width), kernel, strides, params.batch_norm, f"conv{i}")
        if pool:
            h = overlapping_pool(h, f"pool{i}")
    h = layers.Flatten(name="flatten")(h)
    for i, units in enumerate(params.head, start=1):
        h = layers.Dense(scaled(units, params.width), activation="relu", name=f"fc{i}")(h)
        if params.dropout > 0:
            h = layers.Dropout(params.dropout, name=f"fc{i}_dropout")(h)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name="alexnet")
