"""A multilayer perceptron classifier for the ``mlp`` architecture.

The simplest deep network: the input is flattened and passed through a stack of
fully connected layers, each followed (optionally) by a normalization layer, the
activation and dropout; a softmax layer gives the class probabilities::

    x -> Flatten -> [Dense -> (Batch|Layer|Instance norm) -> activation -> Dropout] * depth
      -> Dense(num_classes, softmax)

``hidden: []`` leaves only the softmax layer: multinomial logistic regression, a
linear classifier (it cannot learn XOR; one hidden layer can, see pipelines/xor.yaml).
On a flat vector instance normalization normalizes over the features, like layer
normalization, but with its own scale and shift per feature (see
:class:`dlpipe.models.common.InstanceNormalization`).

It works for any input shape: images are flattened, tables (iris, XOR) pass through
unchanged. The widths are ``hidden`` (one entry per layer), or ``depth`` layers of
``width`` units when ``hidden`` is not given.
"""

from __future__ import annotations

import keras
from keras import layers

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.common import BN_MOMENTUM, InstanceNormalization
from dlpipe.models.mlp import MLPParams


def hidden_widths(params: MLPParams) -> list[int]:
    """The hidden layer widths: ``params.hidden`` or ``depth`` copies of ``width``."""
    if params.hidden is not None:
        return [int(w) for w in params.hidden]
    return [int(params.width)] * int(params.depth)


def num_classes_of(data: DataBundle, name: str) -> int:
    classes = int(data.num_classes or 0)
    if classes < 2:
        raise DlpipeError(
            f"{name}: a classifier needs labelled data with at least 2 classes "
            f"(the data stage reports num_classes={data.num_classes})"
        )
    return classes


def build(params: MLPParams, data: DataBundle) -> keras.Model:
    """The registered builder: an uncompiled MLP classifier for ``data``."""
    classes = num_classes_of(data, "mlp")
    inputs = keras.Input(shape=tuple(data.input_shape), name="x")
    h = layers.Flatten(name="flatten")(inputs) if len(data.input_shape) > 1 else inputs
    use_bias = params.norm == "none"  # a normalization layer brings its own shift
    for i, units in enumerate(hidden_widths(params)):
        h = layers.Dense(units, use_bias=use_bias, name=f"dense_{i}")(h)
        if params.norm == "batch":
            h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"batch_norm_{i}")(h)
        elif params.norm == "layer":
            h = layers.LayerNormalization(name=f"layer_norm_{i}")(h)
        elif params.norm == "instance":
            h = InstanceNormalization(name=f"instance_norm_{i}")(h)
        h = layers.Activation(params.activation, name=f"{params.activation}_{i}")(h)
        if params.dropout > 0:
            h = layers.Dropout(params.dropout, name=f"dropout_{i}")(h)
    # float32 probabilities, also under mixed precision.
    outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="probs")(h)
    return keras.Model(inputs, outputs, name="mlp")
