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

The plot hook draws, for a few test texts, how much the ``[cls]`` token of each block
attends to each character: a glimpse of what the classifier looks at.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from dlpipe.models.attention import PositionalEmbedding, padding_mask
from dlpipe.models.transformer.model import EncoderBlock

PAD_ID = 0
#: The id put in front of every sequence as its ``[cls]`` token (the vocabulary's ``<s>``).
CLS_ID = 1


@keras.saving.register_keras_serializable(package="dlpipe")
class TransformerClassifier(keras.Model):
    """Transformer encoder + pooling + softmax; see the module docstring.

    ``call(ids)`` returns class probabilities ``(b, num_classes)``;
    :meth:`attention_maps` returns every block's attention weights.
    """

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
            raise ValueError(f"pooling must be cls or mean, not {pooling!r}")
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


def check_token_data(data: Any) -> None:
    x = data.x["train"]
    vocab = getattr(data, "source_vocab", None)
    if vocab is None or np.ndim(x) != 2 or not np.issubdtype(np.asarray(x).dtype, np.integer):
        raise ValueError(
            "transformer_classifier: needs token ids (n, length) and a vocabulary, from a "
            f"text classification data stage such as seq_arith_check; got "
            f"{type(data).__name__} '{getattr(data, 'name', '?')}' with inputs "
            f"{tuple(np.shape(x)[1:])}"
        )
    if int(data.num_classes or 0) < 2:
        raise ValueError(f"transformer_classifier: needs at least 2 classes, got "
                         f"{data.num_classes}")


def build(params: Any, data: Any) -> TransformerClassifier:
    """The registered builder: a built, uncompiled :class:`TransformerClassifier`."""
    check_token_data(data)
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


def cls_attention_figure(
    texts: list[str],
    tokens: list[list[str]],
    maps: list[np.ndarray],
    titles: list[str],
) -> Any:
    """One row of panels per example: the ``[cls]`` query's attention over the tokens
    (mean of the heads), one panel per block."""
    from matplotlib.figure import Figure

    rows, blocks = len(texts), len(maps)
    width = max(len(t) for t in tokens) + 1
    fig = Figure(figsize=(min(2.2 + 0.35 * width * blocks, 16), 0.9 * rows + 0.8))
    axes = fig.subplots(rows, blocks, squeeze=False)
    for i in range(rows):
        labels = ["[cls]", *tokens[i]]
        for b in range(blocks):
            weights = maps[b][i].mean(axis=0)[0, : len(labels)]  # the [cls] query row
            ax = axes[i, b]
            ax.imshow(weights[None, :], cmap="viridis", vmin=0.0, aspect="auto")
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"block {b}", fontsize=8)
            if b == 0:
                ax.set_ylabel(titles[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("[cls] attention over the tokens (mean of heads)", fontsize=9)
    fig.tight_layout()
    return fig


def plots(context: Any, model: Any, data: Any) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``cls_attention.png`` for four right and four wrong
    test predictions (fewer when there are not so many)."""
    vocab = getattr(data, "source_vocab", None)
    if vocab is None or not hasattr(model, "attention_maps") or data.size("test") == 0:
        return
    x = np.asarray(data.x["test"], dtype=np.int32)
    y = np.asarray(data.y["test"]).reshape(-1)
    probs = np.asarray(model.predict(x, batch_size=256, verbose=0))
    predicted = probs.argmax(axis=1)
    right = np.flatnonzero(predicted == y)[:4]
    wrong = np.flatnonzero(predicted != y)[:4]
    chosen = np.concatenate([right, wrong]).astype(int)
    if not len(chosen):
        return
    maps = model.attention_maps(x[chosen])
    names = list(data.class_names) or [str(k) for k in range(probs.shape[1])]
    texts = [vocab.decode(x[i]) for i in chosen]
    tokens = [vocab.token_strings(x[i]) for i in chosen]
    titles = [f"{t!r}\ntrue {names[y[i]]}, pred {names[predicted[i]]} "
              f"({probs[i, predicted[i]]:.2f})" for t, i in zip(texts, chosen, strict=True)]
    yield "cls_attention.png", cls_attention_figure(texts, tokens, maps, titles)
