"""Code that several architectures share.

**Hand-written losses.** Keras scales the losses it computes itself for ``tf.distribute``
and mixed precision; a hand-written loss must do both explicitly. A typical
``train_step``::

    with tf.GradientTape() as tape:
        total, terms = self.loss_terms(x, training=True)
        scaled = replica_scaled(total)  # inside the tape, or no gradient reaches it
    apply_gradients(self.optimizer, tape, scaled, self.trainable_variables)

Loss-term weights live in non-trainable variables (:func:`make_loss_weights`) that the
model exposes as ``loss_weights``; the train stage assigns a spec's ``loss_weights``
to them, and callbacks may change them between epochs (KL warm-up) without retracing.

**Building blocks.** The input checks, width multiplier, stem choice and batch-norm
momentum of the CNN classifiers; the encoder trunk of the autoencoder and the VAE;
instance normalization.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import keras
import tensorflow as tf

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError, DlpipeError

#: Batch-norm moving-average momentum: 0.9 (PyTorch's default) rather than Keras' 0.99,
#: so the inference statistics settle within the few hundred steps of a CPU-sized run.
BN_MOMENTUM = 0.9


class LossWeightsError(ConfigError):
    """A loss weight names a term the model does not have."""


def replica_scaled(loss: Any) -> Any:
    """``loss`` divided by the number of replicas in sync.

    Under a ``tf.distribute`` strategy each replica computes the loss of its own part
    of the global batch and the gradients are *summed* across replicas, so a
    per-replica mean loss must be divided by the replica count. A no-op without a
    strategy (one replica).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1:
        return loss
    return loss * keras.ops.cast(1.0 / replicas, loss.dtype)


def apply_gradients(
    optimizer: Any, tape: tf.GradientTape, loss: Any, variables: Iterable[Any]
) -> None:
    """One optimizer step on ``loss``, recorded by ``tape``.

    The loss goes through ``optimizer.scale_loss`` first (mixed-precision loss
    scaling; the identity for a plain optimizer). That multiplication is recorded by
    re-entering ``tape``, so the caller may leave the tape's block before calling
    this. ``optimizer.apply`` unscales the gradients again (and skips the step on
    non-finite ones for a ``LossScaleOptimizer``).
    """
    variables = list(variables)
    with tape:
        scaled = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, variables)
    optimizer.apply(grads, variables)


def batch_mean(values: Any, sample_weight: Any = None) -> Any:
    """The mean of per-example ``values`` ``(batch,)``, weighted by ``sample_weight``
    when given (float32)."""
    ops = keras.ops
    if sample_weight is None:
        return ops.mean(values)
    sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), "float32")
    return ops.sum(values * sample_weight) / ops.maximum(ops.sum(sample_weight), 1e-12)


def make_loss_weights(names: Iterable[str], initial: Mapping[str, float] | None = None) -> dict:
    """One non-trainable float32 scalar ``keras.Variable`` per loss term, by name.

    Assign the result to the model's ``loss_weights`` attribute: Keras then tracks
    the variables (they are saved with the model and mirrored under a strategy).
    Unlisted terms start at 1.0. Create them inside the strategy scope.
    """
    initial = dict(initial or {})
    weights = {}
    for name in names:
        weights[name] = keras.Variable(
            float(initial.pop(name, 1.0)),
            dtype="float32",
            trainable=False,
            name=f"{name}_weight",
        )
    if initial:
        raise LossWeightsError(f"initial weights for unknown loss terms: {sorted(initial)}")
    return weights


def set_loss_weights(model: Any, weights: Mapping[str, float]) -> None:
    """Assign ``weights`` (term name -> value) to ``model.loss_weights``.

    Raises :class:`LossWeightsError` naming the model's terms when a name is not one of
    them.
    """
    terms = getattr(model, "loss_weights", None) or {}
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise LossWeightsError(
            f"model has no loss term(s) {unknown}; its terms are {sorted(terms) or 'none'}"
        )
    for name, value in weights.items():
        terms[name].assign(float(value))


def image_classifier_inputs(name: str, data: DataBundle) -> tuple[tuple[int, ...], int]:
    """``(input shape, number of classes)`` of ``data`` for the image classifier
    ``name``; raises :class:`DlpipeError` unless it holds images of at least 2 classes."""
    input_shape = tuple(data.input_shape)
    classes = int(data.num_classes or 0)
    if len(input_shape) != 3:
        raise DlpipeError(
            f"{name} needs images (height, width, channels), got input shape {input_shape}"
        )
    if classes < 2:
        raise DlpipeError(f"{name}: a classifier needs at least 2 classes, got {classes}")
    return input_shape, classes


def scaled(n: int, width: float) -> int:
    """``n`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(n * width)))


def stem_kind(stem: str, input_shape: tuple[int, ...]) -> str:
    """The spec's ``stem``; ``auto`` is ``imagenet`` from 64x64 up, else ``small``."""
    if stem != "auto":
        return str(stem)
    return "imagenet" if min(input_shape[:2]) >= 64 else "small"


def encoder_trunk(inputs: Any, kind: str, hidden: Iterable[int], activation: str) -> Any:
    """The shared body of the autoencoder and VAE encoders: stride-2 ``Conv2D`` blocks
    (``kind="conv"``) or ``Dense`` layers, flattened for the latent head."""
    h = inputs
    if kind == "conv":
        for i, filters in enumerate(hidden):
            h = keras.layers.Conv2D(
                filters, 3, strides=2, padding="same", activation=activation, name=f"conv_{i}"
            )(h)
        return keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(h)
    return h


@keras.saving.register_keras_serializable(package="dlpipe")
class InstanceNormalization(keras.layers.Layer):
    """Normalize each example's channels on their own (Ulyanov et al., 2016).

    For a feature map ``(batch, height, width, channels)`` the mean and variance are
    taken over height and width, separately for every example and every channel, so
    nothing depends on the rest of the batch (unlike batch normalization) and the
    channels keep their own statistics (unlike layer normalization). A learned
    per-channel scale ``gamma`` and shift ``beta`` follow::

        y = gamma * (x - mean_hw(x)) / sqrt(var_hw(x) + epsilon) + beta

    A flat ``(batch, features)`` vector has no spatial axes; there the statistics are
    taken over the features (one instance is the whole vector), which is layer
    normalization with a per-feature scale and shift.
    """

    def __init__(
        self, epsilon: float = 1e-5, center: bool = True, scale: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)

    def build(self, input_shape: Any) -> None:
        channels = (int(input_shape[-1]),)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma") if self.scale else None
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta") if self.center else None

    def call(self, inputs: Any) -> Any:
        rank = len(inputs.shape)
        axes = list(range(1, rank - 1)) if rank > 2 else [1]
        x = keras.ops.cast(inputs, "float32")  # statistics in float32, also under mixed precision
        mean, variance = keras.ops.moments(x, axes=axes, keepdims=True)
        y = (x - mean) * keras.ops.rsqrt(variance + self.epsilon)
        y = keras.ops.cast(y, self.compute_dtype)
        if self.gamma is not None:
            y = y * keras.ops.cast(self.gamma, y.dtype)
        if self.beta is not None:
            y = y + keras.ops.cast(self.beta, y.dtype)
        return y

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }
