"""LeNet-5 (LeCun et al., 1998) for the ``lenet`` architecture.

The classic convolutional network for 32x32 grey digits, as usually taught:

==========  ==========================================  ===========  ======
layer       operation                                   output       params
==========  ==========================================  ===========  ======
C1          6 conv 5x5, tanh                            28x28x6         156
S2          2x2 average pooling, stride 2               14x14x6           0
C3          16 conv 5x5, tanh (all 6 maps connected)    10x10x16      2,416
S4          2x2 average pooling, stride 2               5x5x16            0
C5          120 units, tanh (a 5x5 conv on 5x5 maps)    120          48,120
F6          84 units, tanh                              84           10,164
output      ``num_classes`` softmax                     10              850
==========  ==========================================  ===========  ======

With a 32x32x1 input and 10 classes that is the published 61,706 parameters. Two
simplifications of the paper that the usual notes make as well: C3 connects to all six
S2 maps (the paper's sparse connection table is dropped), and the output is a softmax
instead of Gaussian RBF units; the subsampling layers are plain average pooling.

Small inputs: with ``padding: auto`` (the default) the convolutions are ``valid`` for
inputs of at least 32x32, as in the paper, and ``same`` for smaller inputs, so 8x8
digits still work. A pooling layer is skipped when its input is a single pixel.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.common import BN_MOMENTUM, InstanceNormalization
from dlpipe.models.lenet import LeNetParams


def conv_padding(params: LeNetParams, input_shape: tuple[int, ...]) -> str:
    """``valid`` or ``same`` for C1 and C3 (``auto``: valid from 32x32 up)."""
    if params.padding != "auto":
        return str(params.padding)
    return "valid" if min(input_shape[:2]) >= 32 else "same"


def check_input(input_shape: tuple[int, ...], padding: str, classes: int) -> None:
    if len(input_shape) != 3:
        raise DlpipeError(
            f"lenet needs images (height, width, channels), got input shape {input_shape}; "
            "use the mlp architecture for tables"
        )
    if classes < 2:
        raise DlpipeError(f"lenet: a classifier needs at least 2 classes, got {classes}")
    if padding == "valid" and min(input_shape[:2]) < 16:
        raise DlpipeError(
            f"lenet with padding 'valid' needs images of at least 16x16, got "
            f"{input_shape[0]}x{input_shape[1]}; set image_size: [32, 32] in the data stage "
            "or padding: same"
        )


def conv(h: Any, filters: int, padding: str, params: LeNetParams, name: str) -> Any:
    """A 5x5 convolution with its activation, and the optional normalization between."""
    act = params.activation
    if params.norm == "none":
        return layers.Conv2D(filters, 5, padding=padding, activation=act, name=name)(h)
    h = layers.Conv2D(filters, 5, padding=padding, use_bias=False, name=name)(h)
    if params.norm == "batch":
        h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(h)
    elif params.norm == "layer":
        h = layers.GroupNormalization(groups=1, name=f"{name}_ln")(h)
    else:
        h = InstanceNormalization(name=f"{name}_in")(h)
    return layers.Activation(act, name=f"{name}_{act}")(h)


def build(params: LeNetParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled LeNet-5 for ``data``."""
    input_shape = tuple(data.input_shape)
    classes = int(data.num_classes or 0)
    padding = conv_padding(params, input_shape)
    check_input(input_shape, padding, classes)
    act = params.activation

    inputs = keras.Input(shape=input_shape, name="x")
    h = conv(inputs, params.filters[0], padding, params, "c1")
    if min(h.shape[1:3]) >= 2:
        h = layers.AveragePooling2D(2, name="s2")(h)
    h = conv(h, params.filters[1], padding, params, "c3")
    if min(h.shape[1:3]) >= 2:
        h = layers.AveragePooling2D(2, name="s4")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(params.units[0], activation=act, name="c5")(h)
    h = layers.Dense(params.units[1], activation=act, name="f6")(h)
    if params.dropout > 0:
        h = layers.Dropout(params.dropout, name="dropout")(h)
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name="lenet5")
