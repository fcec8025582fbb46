"""Attention building blocks shared by the sequence, vision-transformer and image-text
architectures.

Masks are boolean and mean "may attend": ``True`` keeps a score, ``False`` removes it
(its weight becomes exactly 0). They broadcast against the scores ``(..., Tq, Tk)``.
Softmax runs in float32 so masking and mixed precision get along.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.errors import DlpipeError

#: Added to masked scores before the softmax (float32), so their weight underflows to 0.
MASK_VALUE = -1e9


def masked_softmax(scores: Any, mask: Any = None) -> Any:
    """Softmax over the last axis in float32, with ``mask == False`` scores removed."""
    scores = ops.cast(scores, "float32")
    if mask is not None:
        scores = ops.where(ops.cast(mask, "bool"), scores, ops.full_like(scores, MASK_VALUE))
    return ops.softmax(scores, axis=-1)


def scaled_dot_product_attention(
    query: Any, key: Any, value: Any, mask: Any = None
) -> tuple[Any, Any]:
    """``softmax(q k^T / sqrt(d_k)) v`` (Vaswani et al., 2017).

    :param query: ``(..., Tq, d_k)``; ``key``: ``(..., Tk, d_k)``; ``value``: ``(..., Tk, d_v)``.
    :param mask: boolean, broadcastable to ``(..., Tq, Tk)``; ``False`` blocks a key.
    :returns: ``(outputs (..., Tq, d_v), weights (..., Tq, Tk))``; weights are float32.
    """
    depth = ops.shape(key)[-1]
    scale = 1.0 / math.sqrt(float(depth))
    scores = ops.matmul(query, ops.swapaxes(key, -1, -2)) * ops.cast(scale, query.dtype)
    weights = masked_softmax(scores, mask)
    outputs = ops.matmul(ops.cast(weights, value.dtype), value)
    return outputs, weights


def causal_mask(length: Any) -> Any:
    """``(length, length)`` boolean tensor: position ``i`` may attend to ``j <= i`` only.
    ``length`` may be a static int or a traced scalar."""
    rows = ops.expand_dims(ops.arange(length), 1)
    cols = ops.expand_dims(ops.arange(length), 0)
    return ops.greater_equal(rows, cols)


def padding_mask(ids: Any, pad_id: int = 0) -> Any:
    """``(batch, 1, T)`` boolean key mask from token ids: ``False`` at padding."""
    return ops.expand_dims(ops.not_equal(ids, pad_id), axis=1)


def sinusoidal_encoding(length: int, depth: int) -> np.ndarray:
    """The fixed positional encodings of Vaswani et al. (2017), ``(length, depth)``.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/depth))`` and
    ``PE[pos, 2i+1] = cos(pos / 10000^(2i/depth))`` (interleaved sine and cosine).
    """
    positions = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, depth, 2, dtype=np.float64)[None, :]
    angles = positions / np.power(10000.0, two_i / depth)
    pe = np.zeros((length, depth), dtype=np.float64)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles[:, : depth // 2])
    return pe.astype(np.float32)


@keras.saving.register_keras_serializable(package="dlpipe")
class AdditiveAttention(layers.Layer):
    """Bahdanau et al. (2015) scores: ``v^T tanh(W_q q + W_k k)``.

    Called on ``(query (b, Tq, dq), keys (b, Tk, dk))`` with an optional key mask
    ``(b, Tk)``; returns ``(context (b, Tq, dk), weights (b, Tq, Tk))``.
    """

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.query_dense = layers.Dense(units, use_bias=False, name="query")
        self.key_dense = layers.Dense(units, use_bias=True, name="key")
        self.score_dense = layers.Dense(1, use_bias=False, name="score")

    def build(self, input_shape: Any) -> None:
        query_shape, key_shape = input_shape
        self.query_dense.build(query_shape)
        self.key_dense.build(key_shape)
        self.score_dense.build((*key_shape[:-1], self.units))
        self.built = True

    def call(self, inputs: Any, mask: Any = None) -> tuple[Any, Any]:
        query, keys = inputs
        q = ops.expand_dims(self.query_dense(query), 2)  # (b, Tq, 1, u)
        k = ops.expand_dims(self.key_dense(keys), 1)  # (b, 1, Tk, u)
        scores = ops.squeeze(self.score_dense(ops.tanh(q + k)), -1)  # (b, Tq, Tk)
        weights = masked_softmax(scores, None if mask is None else ops.expand_dims(mask, 1))
        context = ops.matmul(ops.cast(weights, keys.dtype), keys)
        return context, weights

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="dlpipe")
class DotProductAttention(layers.Layer):
    """Luong et al. (2015) "dot" scores ``q . k`` (optionally scaled by ``1/sqrt(d)``).

    Query and keys must have the same size. Same call and outputs as
    :class:`AdditiveAttention`.
    """

    def __init__(self, scale: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, inputs: Any, mask: Any = None) -> tuple[Any, Any]:
        query, keys = inputs
        scores = ops.matmul(query, ops.swapaxes(keys, -1, -2))
        if self.scale:
            scores = scores / ops.cast(math.sqrt(int(keys.shape[-1])), scores.dtype)
        weights = masked_softmax(scores, None if mask is None else ops.expand_dims(mask, 1))
        context = ops.matmul(ops.cast(weights, keys.dtype), keys)
        return context, weights

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="dlpipe")
class MultiHeadAttention(layers.Layer):
    """Multi-head attention from parts: per-head projections of query, key and value,
    :func:`scaled_dot_product_attention` in every head, heads concatenated and
    projected back to ``d_model``.

    Called as ``layer(query, context, mask=None)`` with ``query (b, Tq, d_model)``,
    ``context (b, Tk, d_model)`` (pass ``query`` again for self-attention) and a
    boolean mask broadcastable to ``(b, Tq, Tk)``. Returns ``(outputs (b, Tq, d_model),
    weights (b, heads, Tq, Tk))``.
    """

    def __init__(self, num_heads: int, d_model: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if d_model % num_heads:
            raise DlpipeError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.d_model = d_model
        self.depth = d_model // num_heads
        self.wq = layers.Dense(d_model, name="query")
        self.wk = layers.Dense(d_model, name="key")
        self.wv = layers.Dense(d_model, name="value")
        self.wo = layers.Dense(d_model, name="output")

    def build(self, query_shape: Any, context_shape: Any = None) -> None:
        context_shape = query_shape if context_shape is None else context_shape
        self.wq.build(query_shape)
        self.wk.build(context_shape)
        self.wv.build(context_shape)
        self.wo.build((*query_shape[:-1], self.d_model))
        self.built = True

    def _heads(self, x: Any) -> Any:
        """``(b, T, d_model) -> (b, heads, T, depth)``."""
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (b, t, self.num_heads, self.depth))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, query: Any, context: Any = None, mask: Any = None) -> tuple[Any, Any]:
        context = query if context is None else context
        q, k, v = self._heads(self.wq(query)), self._heads(self.wk(context)), self._heads(
            self.wv(context)
        )
        if mask is not None:
            mask = ops.cast(mask, "bool")
            if len(mask.shape) == 3:
                mask = ops.expand_dims(mask, 1)  # the same mask for every head
        outputs, weights = scaled_dot_product_attention(q, k, v, mask)
        b, t = ops.shape(outputs)[0], ops.shape(outputs)[2]
        outputs = ops.reshape(ops.transpose(outputs, (0, 2, 1, 3)), (b, t, self.d_model))
        return self.wo(outputs), weights

    def compute_mask(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads, "d_model": self.d_model}


@keras.saving.register_keras_serializable(package="dlpipe")
class PositionalEmbedding(layers.Layer):
    """Token embedding times ``sqrt(d_model)`` plus a positional encoding:
    fixed ``sinusoidal`` (:func:`sinusoidal_encoding`) or ``learned`` (an Embedding
    of positions). Called on ``(b, T)`` ids with ``T <= length``."""

    def __init__(
        self, vocab_size: int, length: int, d_model: int, kind: str = "sinusoidal", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if kind not in ("sinusoidal", "learned"):
            raise DlpipeError(f"positional encoding must be sinusoidal or learned, not {kind!r}")
        self.vocab_size = vocab_size
        self.length = length
        self.d_model = d_model
        self.kind = kind
        self.token_embedding = layers.Embedding(vocab_size, d_model, name="tokens")
        if kind == "learned":
            self.position_embedding = layers.Embedding(length, d_model, name="positions")
        else:
            self.table = sinusoidal_encoding(length, d_model)

    def build(self, input_shape: Any) -> None:
        self.token_embedding.build(input_shape)
        if self.kind == "learned":
            self.position_embedding.build((self.length,))
        self.built = True

    def call(self, ids: Any) -> Any:
        t = ops.shape(ids)[-1]
        x = self.token_embedding(ids)
        x = x * ops.cast(math.sqrt(self.d_model), x.dtype)
        if self.kind == "learned":
            pe = self.position_embedding(ops.arange(0, t))
        else:
            pe = ops.convert_to_tensor(self.table)[:t]
        return x + ops.cast(pe, x.dtype)

    def compute_mask(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocab_size": self.vocab_size, "length": self.length,
                "d_model": self.d_model, "kind": self.kind}


@keras.saving.register_keras_serializable(package="dlpipe")
class FeedForward(layers.Layer):
    """The position-wise feed-forward network: ``Dense(ff_dim, relu) -> Dense(d_model)``."""

    def __init__(self, d_model: int, ff_dim: int, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_model = d_model
        self.ff_dim = ff_dim
        self.dropout = dropout
        self.inner = layers.Dense(ff_dim, activation="relu", name="inner")
        self.outer = layers.Dense(d_model, name="outer")
        self.drop = layers.Dropout(dropout)

    def build(self, input_shape: Any) -> None:
        self.inner.build(input_shape)
        self.outer.build((*input_shape[:-1], self.ff_dim))
        self.built = True

    def call(self, x: Any, training: bool | None = None) -> Any:
        return self.drop(self.outer(self.inner(x)), training=training)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "d_model": self.d_model, "ff_dim": self.ff_dim,
                "dropout": self.dropout}
