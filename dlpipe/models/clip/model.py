"""A CLIP-style dual encoder (Radford et al., 2021), the ``clip`` architecture.

Two encoders map an image and a caption into the same embedding space:

* the **image encoder** is a small CNN (:class:`ImageEncoder`): stride-2 convolution
  stages turn the image into a grid of feature vectors ("image tokens"), which are
  averaged into one vector;
* the **text encoder** (:class:`TextEncoder`) embeds the caption's token ids with
  positional encodings, runs transformer encoder blocks over them (padding masked) and
  averages the real tokens;
* each side has a linear **projection** to ``embed_dim`` and the result is
  L2-normalized, so the dot product of an image and a caption embedding is their
  cosine similarity.

Training is contrastive. For a batch of ``N`` pairs the logits are the ``N x N``
similarities times a scale ``1 / temperature``; row ``i`` should pick caption ``i``
among the batch's captions (image -> text cross-entropy), column ``j`` image ``j`` (text
-> image); the loss is their average, the **symmetric InfoNCE** loss
(:func:`contrastive_loss`). Its minimum (0) needs each image most similar to its own
caption by a wide margin; uniform similarities give ``log N``.

The temperature is either **learnable** (as in CLIP: a trainable ``log(1/T)`` starting
at ``log(1/init_temperature)``, clipped so ``1/T <= max_logit_scale``) or a fixed float.

Small datasets repeat captions: a batch of digits holds several "the number 7". Treating
those as negatives would push apart what should match, so ``positives`` chooses which
pairs count as matches: ``label`` (same class id, the default), ``caption`` (identical
token ids) or ``pair`` (only the diagonal, plain CLIP). With several matches in a row,
the target is spread evenly over them (:func:`match_targets`).

The two directions are the named loss terms ``image_to_text`` and ``text_to_image``
(``train.loss_weights``, both 1 by default). Training reports ``loss``, both terms,
``temperature`` and ``batch_accuracy`` (image -> text top-1 within the batch).

``model.encode_images(images)`` and ``model.encode_texts(ids)`` return normalized
embeddings; ``model(images)`` (``predict``) the image embeddings, ``model(inputs)`` for
a dict with ``images`` and ``captions`` the pair ``(image_emb, text_emb)``. The
similarity figure is in :mod:`dlpipe.models.clip.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.models.attention import PositionalEmbedding, padding_mask
from dlpipe.models.clip import CLIPParams
from dlpipe.models.common import apply_gradients, make_loss_weights, replica_scaled
from dlpipe.models.transformer.model import EncoderBlock

if TYPE_CHECKING:
    from dlpipe.datasets.captions import CaptionBundle

LOSS_TERMS = ("image_to_text", "text_to_image")
POSITIVES = ("label", "caption", "pair")


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def match_targets(
    positives: str, labels: Any = None, captions: Any = None, batch: Any = None
) -> Any:
    """``(N, N)`` float32 targets: row ``i`` spread evenly over the matches of item ``i``.

    ``label``: items with the same class id match (rows with a negative label match
    only themselves); ``caption``: items with identical caption ids match; ``pair``:
    only the diagonal. The matrix is symmetric and every row sums to 1.
    """
    if positives == "label" and labels is not None:
        labels = ops.cast(labels, "int32")
        n = ops.shape(labels)[0]
        same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
        known = ops.expand_dims(ops.greater_equal(labels, 0), 1)
        match = ops.logical_or(ops.logical_and(same, known), ops.cast(ops.eye(n), "bool"))
    elif positives == "caption" and captions is not None:
        captions = ops.cast(captions, "int32")
        same = ops.equal(ops.expand_dims(captions, 1), ops.expand_dims(captions, 0))
        match = ops.all(same, axis=-1)
    else:
        n = batch if batch is not None else ops.shape(labels if labels is not None else captions)[0]
        match = ops.cast(ops.eye(n), "bool")
    match = ops.cast(match, "float32")
    return match / ops.sum(match, axis=1, keepdims=True)


def contrastive_loss(logits: Any, targets: Any = None) -> tuple[Any, Any]:
    """Symmetric InfoNCE: ``(image -> text, text -> image)`` mean cross-entropies.

    :param logits: ``(N, N)`` scaled similarities, ``logits[i, j]`` for image ``i`` and
        caption ``j``.
    :param targets: ``(N, N)`` row-normalized match targets (symmetric); default the
        identity (pair ``i`` matches only itself).
    """
    logits = ops.cast(logits, "float32")
    if targets is None:
        targets = ops.eye(ops.shape(logits)[0], dtype="float32")
    targets = ops.cast(targets, "float32")
    image_to_text = -ops.sum(targets * ops.log_softmax(logits, axis=1), axis=1)
    text_to_image = -ops.sum(ops.transpose(targets) * ops.log_softmax(logits, axis=0), axis=0)
    return ops.mean(image_to_text), ops.mean(text_to_image)


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class ImageEncoder(layers.Layer):
    """A small CNN that turns images into a sequence of feature vectors.

    Each entry of ``filters`` is one stage: a 3x3 convolution, then a stride-2 3x3
    convolution (each with batch normalization, as in CLIP's ResNet encoders, and a
    ReLU), halving the resolution. Batch statistics spread the initial features apart;
    without them all images start almost at one embedding and contrastive training
    idles on that plateau for several epochs. A 1x1 convolution maps the final
    grid to ``width`` channels and the ``(h', w')`` grid is flattened into ``h' * w'``
    tokens, plus a learned position embedding per token and a LayerNorm.

    Called on ``(b, h, w, c)`` images; returns ``(b, tokens, width)``.
    """

    def __init__(self, filters: Sequence[int] = (32, 64), width: int = 64, batchnorm: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = [int(f) for f in filters]
        self.width = int(width)
        self.batchnorm = bool(batchnorm)
        self.convs = []
        for i, f in enumerate(self.filters):
            for part, stride in (("a", 1), ("b", 2)):
                self.convs.append(layers.Conv2D(f, 3, strides=stride, padding="same",
                                                use_bias=not self.batchnorm, name=f"conv_{i}{part}"))
                if self.batchnorm:
                    self.convs.append(layers.BatchNormalization(momentum=0.9, name=f"bn_{i}{part}"))
                self.convs.append(layers.ReLU(name=f"relu_{i}{part}"))
        self.to_tokens = layers.Conv2D(self.width, 1, name="to_tokens")
        self.norm = layers.LayerNormalization(epsilon=1e-6, name="norm")

    def grid(self, image_shape: Sequence[int]) -> tuple[int, int]:
        h, w = int(image_shape[0]), int(image_shape[1])
        for _ in self.filters:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape)
        for conv in self.convs:
            conv.build(shape)
            shape = tuple(conv.compute_output_shape(shape))
        self.to_tokens.build(shape)
        h, w = self.grid(input_shape[1:3])
        self.positions = self.add_weight(
            shape=(h * w, self.width), initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions")
        self.norm.build((None, h * w, self.width))
        self.built = True

    def call(self, images: Any, training: bool | None = None) -> Any:
        x = images
        for layer in self.convs:
            x = layer(x, training=training) if self.batchnorm else layer(x)
        x = self.to_tokens(x)
        b, h, w = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        x = ops.reshape(x, (b, h * w, self.width))
        return self.norm(x + ops.cast(self.positions, x.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "width": self.width,
                "batchnorm": self.batchnorm}


@keras.saving.register_keras_serializable(package="dlpipe")
class TextEncoder(layers.Layer):
    """Token ids -> one vector: positional embedding, ``num_layers`` transformer encoder
    blocks with the padding masked, then the mean of the real (non-padding) tokens.

    Called on ``(b, T)`` int ids (``T <= length``); returns ``(b, width)``.
    """

    def __init__(self, vocab_size: int, length: int, width: int = 64, num_heads: int = 4,
                 ff_dim: int = 128, num_layers: int = 2, dropout: float = 0.1,
                 positional: str = "sinusoidal", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocab_size, self.length, self.width = int(vocab_size), int(length), int(width)
        self.num_heads, self.ff_dim, self.num_layers = int(num_heads), int(ff_dim), int(num_layers)
        self.dropout_rate, self.positional = float(dropout), positional
        self.embedding = PositionalEmbedding(vocab_size, length, width, positional,
                                             name="embedding")
        self.embedding_dropout = layers.Dropout(dropout)
        self.blocks = [EncoderBlock(width, num_heads, ff_dim, dropout, name=f"block_{i}")
                       for i in range(num_layers)]

    def build(self, input_shape: Any) -> None:
        self.embedding.build(input_shape)
        self.built = True

    def call(self, ids: Any, training: bool | None = None) -> Any:
        ids = ops.cast(ids, "int32")
        mask = padding_mask(ids)
        x = self.embedding_dropout(self.embedding(ids), training=training)
        for block in self.blocks:
            x, _ = block(x, mask=mask, training=training)
        real = ops.cast(ops.expand_dims(ops.not_equal(ids, 0), -1), x.dtype)
        return ops.sum(x * real, axis=1) / ops.maximum(ops.sum(real, axis=1), 1.0)

    def compute_mask(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocab_size": self.vocab_size, "length": self.length,
                "width": self.width, "num_heads": self.num_heads, "ff_dim": self.ff_dim,
                "num_layers": self.num_layers, "dropout": self.dropout_rate,
                "positional": self.positional}


def l2_normalize(x: Any) -> Any:
    x = ops.cast(x, "float32")
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class CLIP(keras.Model):
    """The dual encoder; see the module docstring. Compile with an optimizer only.

    :param temperature: ``None`` for a learnable temperature, else a fixed float.
    """

    #: Keras sets it; declared because ``keras.Model`` is untyped and ``build`` reads it.
    built: bool

    def __init__(
        self,
        image_shape: Sequence[int],
        vocab_size: int,
        caption_length: int,
        embed_dim: int = 64,
        filters: Sequence[int] = (32, 64),
        width: int = 64,
        num_heads: int = 4,
        ff_dim: int = 128,
        text_layers: int = 2,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        temperature: float | None = None,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        positives: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if positives not in POSITIVES:
            raise DlpipeError(f"positives must be one of {POSITIVES}, not {positives!r}")
        self.image_shape = tuple(int(d) for d in image_shape)
        self.vocab_size, self.caption_length = int(vocab_size), int(caption_length)
        self.embed_dim, self.filters, self.width = int(embed_dim), [int(f) for f in filters], int(width)
        self.num_heads, self.ff_dim, self.text_layers = int(num_heads), int(ff_dim), int(text_layers)
        self.dropout_rate, self.positional = float(dropout), positional
        self.temperature = None if temperature is None else float(temperature)
        self.init_temperature, self.max_logit_scale = float(init_temperature), float(max_logit_scale)
        self.positives = positives
        self.image_encoder = ImageEncoder(self.filters, width, name="image_encoder")
        self.text_encoder = TextEncoder(vocab_size, caption_length, width, num_heads, ff_dim,
                                        text_layers, dropout, positional, name="text_encoder")
        self.image_projection = layers.Dense(embed_dim, use_bias=False, name="image_projection")
        self.text_projection = layers.Dense(embed_dim, use_bias=False, name="text_projection")
        start = self.temperature if self.temperature is not None else self.init_temperature
        self.log_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(1.0 / start)),
            trainable=self.temperature is None, name="log_scale")
        self.loss_weights = make_loss_weights(LOSS_TERMS)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.i2t_tracker = keras.metrics.Mean(name="image_to_text_loss")
        self.t2i_tracker = keras.metrics.Mean(name="text_to_image_loss")
        self.accuracy_tracker = keras.metrics.Mean(name="batch_accuracy")
        self.temperature_tracker = keras.metrics.Mean(name="temperature")

    # -- encoders ------------------------------------------------------------------------
    def encode_images(self, images: Any, training: bool | None = None) -> Any:
        """``(b, embed_dim)`` L2-normalized float32 image embeddings."""
        tokens = self.image_encoder(images, training=training)
        return l2_normalize(self.image_projection(ops.mean(tokens, axis=1)))

    def encode_texts(self, ids: Any, training: bool | None = None) -> Any:
        """``(b, embed_dim)`` L2-normalized float32 caption embeddings of token ids."""
        return l2_normalize(self.text_projection(self.text_encoder(ids, training=training)))

    def logit_scale(self) -> Any:
        """``1 / temperature``, the learnable one clipped to ``[1, max_logit_scale]``."""
        log_scale = ops.clip(ops.cast(self.log_scale, "float32"), 0.0,
                             math.log(self.max_logit_scale))
        return ops.exp(log_scale)

    def similarity_logits(self, image_emb: Any, text_emb: Any) -> Any:
        """``(n_images, n_texts)`` scaled cosine similarities."""
        return self.logit_scale() * ops.matmul(image_emb, ops.transpose(text_emb))

    # -- Keras ---------------------------------------------------------------------------
    def build(self, input_shape: Any = None) -> None:
        if self.built:
            return
        images = ops.zeros((1, *self.image_shape))
        ids = ops.ones((1, self.caption_length), dtype="int32")
        self.encode_images(images)
        self.encode_texts(ids)
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if isinstance(inputs, dict):
            return (self.encode_images(inputs["images"], training=training),
                    self.encode_texts(inputs["captions"], training=training))
        if isinstance(inputs, (list, tuple)):
            return (self.encode_images(inputs[0], training=training),
                    self.encode_texts(inputs[1], training=training))
        return self.encode_images(inputs, training=training)

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_tracker, self.i2t_tracker, self.t2i_tracker, self.accuracy_tracker,
                self.temperature_tracker]

    def loss_parts(self, x: dict[str, Any], training: bool = False) -> tuple[Any, Any, Any, Any]:
        """``(total, image_to_text, text_to_image, logits)`` for a batch of inputs."""
        image_emb = self.encode_images(x["images"], training=training)
        text_emb = self.encode_texts(x["captions"], training=training)
        logits = self.similarity_logits(image_emb, text_emb)
        targets = match_targets(self.positives, x.get("labels"), x["captions"],
                                ops.shape(logits)[0])
        i2t, t2i = contrastive_loss(logits, targets)
        total = 0.5 * (self.loss_weights["image_to_text"] * i2t
                       + self.loss_weights["text_to_image"] * t2i)
        return total, i2t, t2i, (logits, targets)

    def _inputs(self, data: Any) -> dict[str, Any]:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, (list, tuple)):
            x = {"images": x[0], "captions": x[1]}
        return x

    def _track(self, total: Any, i2t: Any, t2i: Any, logits_targets: Any) -> dict[str, Any]:
        logits, targets = logits_targets
        best = ops.argmax(logits, axis=1)
        hit = ops.take_along_axis(targets, ops.expand_dims(best, 1), axis=1)[:, 0] > 0
        self.loss_tracker.update_state(total)
        self.i2t_tracker.update_state(i2t)
        self.t2i_tracker.update_state(t2i)
        self.accuracy_tracker.update_state(ops.mean(ops.cast(hit, "float32")))
        self.temperature_tracker.update_state(1.0 / self.logit_scale())
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, Any]:
        x = self._inputs(data)
        with tf.GradientTape() as tape:
            total, i2t, t2i, extra = self.loss_parts(x, training=True)
            penalty = ops.sum(self.losses) if self.losses else 0.0  # train.regularization
            scaled = replica_scaled(total + penalty)
        apply_gradients(self.optimizer, tape, scaled, self.trainable_variables)
        return self._track(total, i2t, t2i, extra)

    def test_step(self, data: Any) -> dict[str, Any]:
        total, i2t, t2i, extra = self.loss_parts(self._inputs(data), training=False)
        return self._track(total, i2t, t2i, extra)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "image_shape": list(self.image_shape), "vocab_size": self.vocab_size,
            "caption_length": self.caption_length, "embed_dim": self.embed_dim,
            "filters": self.filters, "width": self.width, "num_heads": self.num_heads,
            "ff_dim": self.ff_dim, "text_layers": self.text_layers,
            "dropout": self.dropout_rate, "positional": self.positional,
            "temperature": self.temperature, "init_temperature": self.init_temperature,
            "max_logit_scale": self.max_logit_scale, "positives": self.positives,
        }


def check_caption_data(name: str, data: DataBundle) -> None:
    """Raise :class:`DlpipeError` when ``data`` is not a caption bundle."""
    if getattr(data, "captions", None) is None or getattr(data, "vocab", None) is None:
        raise DlpipeError(
            f"{name}: needs image-caption data (the 'captions' data stage), got "
            f"{type(data).__name__} '{getattr(data, 'name', '?')}'"
        )


def build(params: CLIPParams, data: CaptionBundle) -> CLIP:
    """The registered builder: a built, uncompiled :class:`CLIP` for caption data."""
    check_caption_data("clip", data)
    assert data.vocab is not None  # checked above
    temperature = None if params.temperature == "learnable" else float(params.temperature)
    model = CLIP(
        image_shape=data.input_shape,
        vocab_size=data.vocab.size,
        caption_length=data.caption_length,
        embed_dim=params.embed_dim,
        filters=params.filters,
        width=params.width,
        num_heads=params.num_heads,
        ff_dim=params.ff_dim,
        text_layers=params.text_layers,
        dropout=params.dropout,
        positional=params.positional,
        temperature=temperature,
        init_temperature=params.init_temperature,
        max_logit_scale=params.max_logit_scale,
        positives=params.positives,
        name="clip",
    )
    model.build()
    return model


# --------------------------------------------------------------------------------------
# Embeddings in batches
# --------------------------------------------------------------------------------------


def embed(fn: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``fn`` (an encoder method) applied in batches; float32 NumPy."""
    parts = [np.asarray(ops.convert_to_numpy(fn(x[i : i + batch_size], training=False)))
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

