"""GoogLeNet / Inception v1 (Szegedy et al., 2015) for the ``inception`` architecture.

An *inception block* looks at its input at several scales at once, in four parallel
branches whose outputs are concatenated along the channels:

* a 1x1 convolution;
* a 1x1 *reduction* then a 3x3 convolution;
* a 1x1 reduction then a 5x5 convolution;
* 3x3 max pooling (stride 1) then a 1x1 projection.

The 1x1 reductions are what keep this affordable: the expensive 3x3 and 5x5
convolutions see few channels. GoogLeNet stacks nine blocks (3a-3b, 4a-4e, 5a-5b,
with the paper's filter counts times ``width``) with 3x3 stride-2 max pooling between
the groups, ends in global average pooling instead of large dense layers, dropout
(0.4) and a softmax.

**Auxiliary classifiers.** During training two small classifiers on the outputs of
blocks 4a (``aux1``) and 4d (``aux2``) add their losses to the main one, which gives
the middle of the deep network a direct gradient. Each is 5x5 average pooling with
stride 3, a 1x1 convolution (128), a dense layer (1024), dropout (0.7) and a softmax.
The loss is a weighted sum of *named* terms

    loss = w_main * CE(main) + w_aux1 * CE(aux1) + w_aux2 * CE(aux2)

whose weights live in ``model.loss_weights`` (0.3 for the auxiliary heads, as in the
paper, unless ``aux_weight`` says otherwise); a spec sets them with
``train.loss_weights.aux1`` and a tune stage can search them. Training reports
``loss`` (the weighted sum), ``main_loss``, ``aux1_loss``, ``aux2_loss`` and
``accuracy`` (of the main head). The auxiliary heads are dropped at inference, as in
the paper: ``model(x)`` and ``predict`` return the main head's probabilities, and
evaluation reports ``val_loss``, the main head's cross-entropy *unweighted* (so it stays
comparable when the auxiliary weights change), and ``val_accuracy``.

Options beyond the paper: ``blocks`` keeps only the first blocks of each group
(GoogLeNet is ``[2, 5, 2]``; ``[1, 2, 1]`` is a quick CPU-sized network, whose auxiliary
heads read the first and the last block of group 4); ``batch_norm`` after every
convolution (on by default; it came with Inception v2 and makes the network train
quickly); and the ``stem``: ``imagenet`` is the paper's (7x7 stride 2, max pooling,
1x1, 3x3, max pooling) for ~224x224 images, ``small`` two 3x3 convolutions and one
pooling for small images, ``auto`` picks ``imagenet`` from 64x64 up. Pooling layers are skipped once the map is
1x1, and an auxiliary head uses global average pooling when its input is smaller than
5x5, so 8x8 digits work.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.models.common import (
    BN_MOMENTUM,
    batch_mean,
    image_classifier_inputs,
    make_loss_weights,
    replica_scaled,
    scaled,
    stem_kind,
)
from dlpipe.models.inception import InceptionParams

#: GoogLeNet's blocks per group: (name, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool
#: projection). A 3x3 stride-2 max pooling separates the groups.
GROUPS: tuple[tuple[tuple[Any, ...], ...], ...] = (
    (
        ("3a", 64, 96, 128, 16, 32, 32),
        ("3b", 128, 128, 192, 32, 96, 64),
    ),
    (
        ("4a", 192, 96, 208, 16, 48, 64),
        ("4b", 160, 112, 224, 24, 64, 64),
        ("4c", 128, 128, 256, 24, 64, 64),
        ("4d", 112, 144, 288, 32, 64, 64),
        ("4e", 256, 160, 320, 32, 128, 128),
    ),
    (
        ("5a", 256, 160, 320, 32, 128, 128),
        ("5b", 384, 192, 384, 48, 128, 128),
    ),
)
MAIN = "main"


# --------------------------------------------------------------------------------------
# The network: a functional model with the main and the auxiliary outputs
# --------------------------------------------------------------------------------------


def conv(h: Any, filters: int, kernel: int, name: str, strides: int = 1, batch_norm: bool = True) -> Any:
    h = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=not batch_norm, name=name
    )(h)
    if batch_norm:
        h = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(h)
    return layers.ReLU(name=f"{name}_relu")(h)


def max_pool(h: Any, name: str) -> Any:
    """3x3 stride-2 max pooling, skipped when the map is already 1x1."""
    if min(h.shape[1:3]) < 2:
        return h
    return layers.MaxPooling2D(3, strides=2, padding="same", name=name)(h)


def inception_block(h: Any, spec: tuple[Any, ...], width: float, batch_norm: bool) -> Any:
    name, f1, r3, f3, r5, f5, fp = spec
    n = f"inception{name}"
    b1 = conv(h, scaled(f1, width), 1, f"{n}_1x1", batch_norm=batch_norm)
    b3 = conv(h, scaled(r3, width), 1, f"{n}_3x3_reduce", batch_norm=batch_norm)
    b3 = conv(b3, scaled(f3, width), 3, f"{n}_3x3", batch_norm=batch_norm)
    b5 = conv(h, scaled(r5, width), 1, f"{n}_5x5_reduce", batch_norm=batch_norm)
    b5 = conv(b5, scaled(f5, width), 5, f"{n}_5x5", batch_norm=batch_norm)
    bp = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{n}_pool")(h)
    bp = conv(bp, scaled(fp, width), 1, f"{n}_pool_proj", batch_norm=batch_norm)
    return layers.Concatenate(name=f"{n}_concat")([b1, b3, b5, bp])


def aux_head(h: Any, classes: int, width: float, dropout: float, batch_norm: bool, name: str) -> Any:
    if min(h.shape[1:3]) >= 5:
        h = layers.AveragePooling2D(5, strides=3, name=f"{name}_pool")(h)
    else:  # small maps: pool them whole
        h = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(h)
    h = conv(h, scaled(128, width), 1, f"{name}_conv", batch_norm=batch_norm)
    h = layers.Flatten(name=f"{name}_flatten")(h)
    h = layers.Dense(scaled(1024, width), activation="relu", name=f"{name}_fc")(h)
    if dropout > 0:
        h = layers.Dropout(dropout, name=f"{name}_dropout")(h)
    return layers.Dense(classes, activation="softmax", dtype="float32", name=name)(h)


def aux_positions(blocks_in_group4: int) -> dict[int, list[str]]:
    """Which block of group 4 each auxiliary head reads: 4a and 4d in GoogLeNet; with
    fewer blocks the first one and the last one (both the first one if it is alone)."""
    first, second = 0, min(3, blocks_in_group4 - 1)
    if first == second:
        return {first: ["aux1", "aux2"]}
    return {first: ["aux1"], second: ["aux2"]}


def build_network(
    params: InceptionParams, input_shape: tuple[int, ...], classes: int
) -> keras.Model:
    """``x -> [main, aux1, aux2]`` (``[main]`` without auxiliary heads)."""
    w, bn = params.width, params.batch_norm
    inputs = keras.Input(shape=input_shape, name="x")
    if stem_kind(params.stem, input_shape) == "imagenet":
        h = conv(inputs, scaled(64, w), 7, "stem_conv1", strides=2, batch_norm=bn)
        h = max_pool(h, "stem_pool1")
        h = conv(h, scaled(64, w), 1, "stem_conv2", batch_norm=bn)
        h = conv(h, scaled(192, w), 3, "stem_conv3", batch_norm=bn)
        h = max_pool(h, "stem_pool2")
    else:
        h = conv(inputs, scaled(64, w), 3, "stem_conv1", batch_norm=bn)
        h = conv(h, scaled(192, w), 3, "stem_conv2", batch_norm=bn)
        h = max_pool(h, "stem_pool")

    aux_after = aux_positions(params.blocks[1])
    aux_outputs = []
    for g, (group, count) in enumerate(zip(GROUPS, params.blocks, strict=True)):
        if g > 0:
            h = max_pool(h, f"pool{g + 2}")
        for b, spec in enumerate(group[:count]):
            h = inception_block(h, spec, w, bn)
            if params.aux_heads and g == 1 and b in aux_after:
                for name in aux_after[b]:
                    aux_outputs.append(aux_head(h, classes, w, params.aux_dropout, bn, name))

    h = layers.GlobalAveragePooling2D(name="avg_pool")(h)
    if params.dropout > 0:
        h = layers.Dropout(params.dropout, name="dropout")(h)
    main = layers.Dense(classes, activation="softmax", dtype="float32", name=MAIN)(h)
    return keras.Model(inputs, [main, *aux_outputs], name="googlenet")


# --------------------------------------------------------------------------------------
# The model: named loss terms, auxiliary heads only while training
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class InceptionClassifier(keras.Model):
    """A classifier with auxiliary heads whose losses are weighted by name.

    :param network: a functional model ``x -> [main, aux...]`` whose output layers are
        named after their loss terms (``main``, ``aux1``, ``aux2``).
    :param aux_weight: the initial weight of every auxiliary term.

    ``model(x, training=True)`` returns a tuple of the probabilities of every head;
    otherwise the main head's probabilities only (the auxiliary heads are not run).
    Compile with an optimizer only: the loss is built in.
    """

    def __init__(self, network: keras.Model, aux_weight: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.aux_weight = float(aux_weight)
        self.head_names = [str(n) for n in network.output_names]
        # Shares the layers of `network`, without the auxiliary heads.
        self.classifier = keras.Model(network.inputs, network.outputs[0], name="classifier")
        self.loss_weights = make_loss_weights(
            self.head_names, {n: self.aux_weight for n in self.head_names if n != MAIN}
        )
        self.term_trackers = [keras.metrics.Mean(name=f"{n}_loss") for n in self.head_names]
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def build(self, input_shape: Any = None) -> None:
        self.built = True  # the functional network is built already

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if training and len(self.head_names) > 1:
            return tuple(self.network(inputs, training=True))
        return self.classifier(inputs, training=training)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        outputs = y_pred if isinstance(y_pred, (list, tuple)) else (y_pred,)
        terms = {
            name: crossentropy(y, probs, sample_weight)
            for name, probs in zip(self.head_names, outputs, strict=False)
        }
        batch = ops.shape(y)[0]
        for tracker, name in zip(self.term_trackers, self.head_names, strict=True):
            if name in terms:  # weighted by batch size, like Keras' own loss tracker
                tracker.update_state(terms[name], sample_weight=batch)
        if len(terms) == 1:  # inference: the main head alone, unweighted
            total = terms[MAIN]
        else:
            total = sum(self.loss_weights[name] * value for name, value in terms.items())
        if self.losses:  # regularizers
            total = total + ops.cast(ops.sum(self.losses), total.dtype)
        return replica_scaled(total)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        training = isinstance(y_pred, (list, tuple))
        main = y_pred[0] if training else y_pred
        self.accuracy_tracker.update_state(y, main, sample_weight=sample_weight)
        results = super().compute_metrics(x, y, main, sample_weight)
        if not training:  # no auxiliary heads: the loss is the main term alone
            terms = {f"{n}_loss" for n in self.head_names}
            results = {k: v for k, v in results.items() if k not in terms}
        return results

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "aux_weight": self.aux_weight,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> InceptionClassifier:
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        return cls(network, **config)


def crossentropy(y: Any, probs: Any, sample_weight: Any = None) -> Any:
    """Mean sparse categorical cross-entropy of a batch, in float32."""
    per_example = keras.losses.sparse_categorical_crossentropy(y, ops.cast(probs, "float32"))
    return batch_mean(per_example, sample_weight)


def build(params: InceptionParams, data: DataBundle) -> InceptionClassifier:
    """The registered builder: a built, uncompiled :class:`InceptionClassifier`."""
    input_shape, classes = image_classifier_inputs("inception", data)
    network = build_network(params, input_shape, classes)
    model = InceptionClassifier(network, aux_weight=params.aux_weight, name="inception")
    model.build(input_shape)
    return model
