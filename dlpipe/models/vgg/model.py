"""VGG networks (Simonyan & Zisserman, 2015) for the ``vgg`` architecture.

VGG showed that depth built from one simple part goes far: stacks of 3x3
convolutions ("same" padding, ReLU) separated by 2x2 max pooling, then a classifier
head of large dense layers. The four variants of the paper differ only in how many
convolutions each of the five blocks has:

=======  ===============  ============
variant  convs per block  paper column
=======  ===============  ============
VGG-11   1, 1, 2, 2, 2    A
VGG-13   2, 2, 2, 2, 2    B
VGG-16   2, 2, 3, 3, 3    D
VGG-19   2, 2, 4, 4, 4    E
=======  ===============  ============

with 64, 128, 256, 512 and 512 filters per block. VGG-16 at 224x224x3 with 1000
classes and the 4096-4096 head has the published 138,357,544 parameters.

Options beyond the paper: ``width`` multiplies every filter count; ``batch_norm``
adds batch normalization after each convolution (VGG-BN); ``head`` lists the dense
widths (``[]`` for none) and ``pooling`` chooses how the last feature map becomes a
vector (``flatten`` as in the paper, or global ``avg``/``max`` pooling, which makes
the head independent of the input size).

Small inputs: a block's max pooling is skipped when the map is already 1x1, so
32x32 images go down to 1x1 after five blocks and 8x8 digits work too.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.models.common import BN_MOMENTUM, image_classifier_inputs, scaled
from dlpipe.models.vgg import VGGParams

#: Convolutions per block for each depth.
BLOCKS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
FILTERS = (64, 128, 256, 512, 512)


def vgg_block(h: Any, convs: int, filters: int, batch_norm: bool, name: str) -> Any:
    for i in range(1, convs + 1):
        h = layers.Conv2D(
            filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}"
        )(h)
        if batch_norm:
            h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{i}")(h)
        h = layers.ReLU(name=f"{name}_relu{i}")(h)
    if min(h.shape[1:3]) >= 2:
        h = layers.MaxPooling2D(2, name=f"{name}_pool")(h)
    return h


def build(params: VGGParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled VGG-``depth`` classifier for ``data``."""
    input_shape, classes = image_classifier_inputs("vgg", data)

    inputs = keras.Input(shape=input_shape, name="x")
    h = inputs
    for b, (convs, filters) in enumerate(zip(BLOCKS[params.depth], FILTERS, strict=True), start=1):
        h = vgg_block(h, convs, scaled(filters, params.width), params.batch_norm, f"block{b}")
    if params.pooling == "avg":
        h = layers.GlobalAveragePooling2D(name="avg_pool")(h)
    elif params.pooling == "max":
        h = layers.GlobalMaxPooling2D(name="max_pool")(h)
    else:
        h = layers.Flatten(name="flatten")(h)
    for i, units in enumerate(params.head, start=1):
        h = layers.Dense(units, activation="relu", name=f"fc{i}")(h)
        if params.dropout > 0:
            h = layers.Dropout(params.dropout, name=f"fc{i}_dropout")(h)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name=f"vgg{params.depth}")
