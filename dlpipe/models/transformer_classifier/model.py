"""A transformer encoder that classifies token sequences (``transformer_classifier``).

The encoder half of Vaswani et al. (2017) with a classification head, as in BERT
(Devlin et al., 2019) without the pre-training:

1. a ``[cls]`` token is put in front of every sequence (the start token ``<s>`` of the
   vocabulary plays that part: it never occurs inside a text);
2. token embeddings times ``sqrt(d_model)`` plus ``sinusoidal`` or ``learned`` positional
   encodings (:class:`~dlpipe.models.attention.PositionalEmbedding`);
3. ``num_layers`` encoder blocks (:class:`~dlpipe.models.transformer.model.EncoderBlock`:
   multi-head self-attention and a feed-forward network, each with add & norm). The
   padding mask removes padded keys from every attention, so padding never changes a
   real token's representation;
4. pooling: the final ``[cls]`` vector (``cls``), or the mean over the real tokens
   (``mean``, padding left out);
5. dropout and a softmax over the classes.

Because padded positions are masked out of the attention and out of the pooling, the
prediction depends only on the real tokens: the same text padded to any length (up to
``max_length``) gets the same probabilities. The model takes ``(batch, T)`` int ids with
``T <= max_length``; id 0 is padding.

The plot hook (:mod:`dlpipe.models.transformer_classifier.plots`) draws, for a few test
texts, how much the ``[cls]`` token of each block attends to each character: a glimpse
of what the classifier looks at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.data import DataBundle
from dlpipe.datasets.vocab import PAD_ID, START_ID
from dlpipe.errors import DlpipeError
from dlpipe.models.attention import PositionalEmbedding, padding_mask
from dlpipe.models.transformer.model import EncoderBlock
from dlpipe.models.transformer_classifier import TransformerClassifierParams

if TYPE_CHECKING:
    from dlpipe.datasets.bundles import TextClassBundle

#: The id put in front of every sequence as its ``[cls]`` token (the vocabulary's ``<s>``).
CLS_ID = START_ID


@keras.saving.register_keras_serializable(package="dlpipe")
class TransformerClassifier(keras.Model):
    """Transformer encoder + pooling + softmax; see the module docstring.

    ``call(ids)`` returns class probabilities ``(b, num_classes)``;
    :meth:`attention_maps` returns every block's attention weights.
    """

    #: Keras sets it; declared because ``keras.Model`` is untyped and ``build`` reads it.
    built: bool

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        num_classes: int,
        d_model: int = 64,
        num_heads: int = 4,
        ff_dim: int = 128,
        num_layers: int = 2,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        pooling: str = "cls",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if pooling not in ("cls", "mean"):
            raise DlpipeError(f"pooling must be cls or mean, not {pooling!r}")
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.num_classes = int(num_classes)
        self.d_model = d_model
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.num_layers = num_layers
        self.dropout_rate = dropout
        self.positional = positional
        self.pooling = pooling
        # + 1 position for the [cls] token in front.
        self.embedding = PositionalEmbedding(
            self.vocab_size, self.max_length + 1, d_model, positional, name="embedding")
        self.embedding_dropout = layers.Dropout(dropout)
        self.blocks = [
            EncoderBlock(d_model, num_heads, ff_dim, dropout, name=f"encoder_{i}")
            for i in range(num_layers)
        ]
        self.head_dropout = layers.Dropout(dropout)
        self.classifier = layers.Dense(num_classes, activation="softmax", dtype="float32",
                                       name="probs")

    def encode(self, ids: Any, training: bool | None = None) -> tuple[Any, Any, list[Any]]:
        """``(hidden (b, 1+T, d), ids with [cls] (b, 1+T), attention per block)``."""
        ids = ops.cast(ids, "int32")
        cls = ops.full_like(ids[:, :1], CLS_ID)
        ids = ops.concatenate([cls, ids], axis=1)
        mask = padding_mask(ids, PAD_ID)  # (b, 1, 1+T): padded keys get no attention
        x = self.embedding_dropout(self.embedding(ids), training=training)
        maps = []
        for block in self.blocks:
            x, weights = block(x, mask=mask, training=training)
            maps.append(weights)
        return x, ids, maps

    def pool(self, hidden: Any, ids: Any) -> Any:
        """The ``[cls]`` vector, or the mean over real (non-padding) tokens."""
        if self.pooling == "cls":
            return hidden[:, 0]
        real = ops.cast(ops.not_equal(ids[:, 1:], PAD_ID), hidden.dtype)[..., None]
        total = ops.sum(hidden[:, 1:] * real, axis=1)
        return total / ops.maximum(ops.sum(real, axis=1), ops.cast(1.0, hidden.dtype))

    def call(self, ids: Any, training: bool | None = None) -> Any:
        hidden, ids, _ = self.encode(ids, training=training)
        pooled = self.head_dropout(self.pool(hidden, ids), training=training)
        return self.classifier(pooled)

    def attention_maps(self, ids: Any) -> list[np.ndarray]:
        """Attention weights of every block, ``(b, heads, 1+T, 1+T)`` each ([cls] first)."""
        _, _, maps = self.encode(ids, training=False)
        return [np.asarray(ops.convert_to_numpy(w)) for w in maps]

    def build(self, input_shape: Any = None) -> None:
        """Create the variables with one pass on dummy ids (also used by ``load_model``)."""
        if self.built:
            return
        self.call(ops.ones((1, self.max_length), dtype="int32"), training=False)
        self.built = True

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "num_classes": self.num_classes,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "ff_dim": self.ff_dim,
            "num_layers": self.num_layers,
            "dropout": self.dropout_rate,
            "positional": self.positional,
            "pooling": self.pooling,
        }


def check_token_data(data: DataBundle) -> None:
    """Raise :class:`DlpipeError` unless ``data`` holds token ids of at least 2 classes."""
    x = data.x["train"]
    vocab = getattr(data, "source_vocab", None)
    if vocab is None or np.ndim(x) != 2 or not np.issubdtype(np.asarray(x).dtype, np.integer):
        raise DlpipeError(
            "transformer_classifier: needs token ids (n, length) and a vocabulary, from a "
            f"text classification data stage such as seq_arith_check; got "
            f"{type(data).__name__} '{getattr(data, 'name', '?')}' with inputs "
            f"{tuple(np.shape(x)[1:])}"
        )
    if int(data.num_classes or 0) < 2:
        raise DlpipeError(f"transformer_classifier: needs at least 2 classes, got "
                         f"{data.num_classes}")


def build(params: TransformerClassifierParams, data: TextClassBundle) -> TransformerClassifier:
    """The registered builder: a built, uncompiled :class:`TransformerClassifier`."""
    check_token_data(data)
    assert data.source_vocab is not None and data.num_classes is not None  # checked above
    model = TransformerClassifier(
        vocab_size=data.source_vocab.size,
        max_length=int(data.x["train"].shape[1]),
        num_classes=int(data.num_classes),
        d_model=params.d_model,
        num_heads=params.num_heads,
        ff_dim=params.ff_dim,
        num_layers=params.num_layers,
        dropout=params.dropout,
        positional=params.positional,
        pooling=params.pooling,
        name="transformer_classifier",
    )
    model.build()
    return model
