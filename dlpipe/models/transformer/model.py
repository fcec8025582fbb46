"""A transformer encoder-decoder (Vaswani et al., 2017) built from the parts in
:mod:`dlpipe.models.attention`.

* embeddings: token embedding times ``sqrt(d_model)`` plus ``sinusoidal`` or
  ``learned`` positional encodings;
* encoder block: multi-head self-attention (padding masked), add & norm, position-wise
  feed-forward, add & norm;
* decoder block: causally masked multi-head self-attention, add & norm,
  cross-attention over the encoder output (padding masked), add & norm, feed-forward,
  add & norm;
* a softmax over the target vocabulary.

Residual dropout is applied to every sub-layer's output before the addition (post-norm,
as in the paper). ``decode`` returns the cross-attention weights of the last decoder
block, ``(b, heads, T, S)``, for the heat-maps. Decoding, metrics and heat-maps are
shared with the seq2seq model in :mod:`dlpipe.models.decoding`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
from keras import layers, ops

from dlpipe.models.attention import (
    FeedForward,
    MultiHeadAttention,
    PositionalEmbedding,
    causal_mask,
    padding_mask,
)
from dlpipe.models.decoding import EncoderDecoder, sequence_sizes
from dlpipe.models.decoding import plots as attention_plots
from dlpipe.models.transformer import TransformerParams

if TYPE_CHECKING:
    from dlpipe.datasets.bundles import SeqBundle


@keras.saving.register_keras_serializable(package="dlpipe")
class EncoderBlock(layers.Layer):
    """Self-attention and feed-forward, each followed by add & norm."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_model, self.num_heads, self.ff_dim, self.dropout_rate = (
            d_model, num_heads, ff_dim, dropout)
        self.self_attention = MultiHeadAttention(num_heads, d_model, name="self_attention")
        self.feed_forward = FeedForward(d_model, ff_dim, dropout, name="feed_forward")
        self.attention_dropout = layers.Dropout(dropout)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")

    def call(self, x: Any, mask: Any = None, training: bool | None = None) -> tuple[Any, Any]:
        attended, weights = self.self_attention(x, x, mask=mask)
        x = self.norm1(x + self.attention_dropout(attended, training=training))
        x = self.norm2(x + self.feed_forward(x, training=training))
        return x, weights

    def compute_mask(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(package="dlpipe")
class DecoderBlock(layers.Layer):
    """Causal self-attention, cross-attention and feed-forward, each with add & norm."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_model, self.num_heads, self.ff_dim, self.dropout_rate = (
            d_model, num_heads, ff_dim, dropout)
        self.self_attention = MultiHeadAttention(num_heads, d_model, name="self_attention")
        self.cross_attention = MultiHeadAttention(num_heads, d_model, name="cross_attention")
        self.feed_forward = FeedForward(d_model, ff_dim, dropout, name="feed_forward")
        self.self_dropout = layers.Dropout(dropout)
        self.cross_dropout = layers.Dropout(dropout)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.norm3 = layers.LayerNormalization(epsilon=1e-6, name="norm3")

    def call(
        self,
        y: Any,
        memory: Any,
        self_mask: Any = None,
        cross_mask: Any = None,
        training: bool | None = None,
    ) -> tuple[Any, Any, Any]:
        attended, self_weights = self.self_attention(y, y, mask=self_mask)
        y = self.norm1(y + self.self_dropout(attended, training=training))
        attended, cross_weights = self.cross_attention(y, memory, mask=cross_mask)
        y = self.norm2(y + self.cross_dropout(attended, training=training))
        y = self.norm3(y + self.feed_forward(y, training=training))
        return y, self_weights, cross_weights

    def compute_mask(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(package="dlpipe")
class Transformer(EncoderDecoder):
    """Transformer encoder-decoder; see the module docstring. ``encode`` returns the
    encoder output ``(b, S, d_model)``."""

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        source_length: int,
        target_length: int,
        d_model: int = 64,
        num_heads: int = 4,
        ff_dim: int = 128,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        **kwargs: Any,
    ) -> None:
        super().__init__(source_vocab_size, target_vocab_size, source_length, target_length,
                         **kwargs)
        self.d_model = d_model
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.dropout_rate = dropout
        self.positional = positional
        self.source_embedding = PositionalEmbedding(
            source_vocab_size, source_length, d_model, positional, name="source_embedding")
        self.target_embedding = PositionalEmbedding(
            target_vocab_size, target_length, d_model, positional, name="target_embedding")
        self.source_dropout = layers.Dropout(dropout)
        self.target_dropout = layers.Dropout(dropout)
        self.encoder_blocks = [
            EncoderBlock(d_model, num_heads, ff_dim, dropout, name=f"encoder_{i}")
            for i in range(encoder_layers)
        ]
        self.decoder_blocks = [
            DecoderBlock(d_model, num_heads, ff_dim, dropout, name=f"decoder_{i}")
            for i in range(decoder_layers)
        ]
        self.output_layer = layers.Dense(target_vocab_size, activation="softmax",
                                         dtype="float32", name="next_token")

    def encode(self, encoder_ids: Any, training: bool | None = None) -> Any:
        mask = padding_mask(encoder_ids)
        x = self.source_dropout(self.source_embedding(encoder_ids), training=training)
        for block in self.encoder_blocks:
            x, _ = block(x, mask=mask, training=training)
        return x

    def decode(
        self, memory: Any, encoder_ids: Any, decoder_ids: Any, training: bool | None = None
    ) -> tuple[Any, Any]:
        self_mask = causal_mask(ops.shape(decoder_ids)[1])
        cross_mask = padding_mask(encoder_ids)
        y = self.target_dropout(self.target_embedding(decoder_ids), training=training)
        cross = None
        for block in self.decoder_blocks:
            y, _, cross = block(y, memory, self_mask=self_mask, cross_mask=cross_mask,
                                training=training)
        return self.output_layer(y), cross

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "ff_dim": self.ff_dim,
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "dropout": self.dropout_rate,
            "positional": self.positional,
        }


def build(params: TransformerParams, data: SeqBundle) -> Transformer:
    """The registered builder: a built, uncompiled :class:`Transformer` for ``data``."""
    model = Transformer(
        **sequence_sizes("transformer", data),
        d_model=params.d_model,
        num_heads=params.num_heads,
        ff_dim=params.ff_dim,
        encoder_layers=params.encoder_layers,
        decoder_layers=params.decoder_layers,
        dropout=params.dropout,
        positional=params.positional,
        name="transformer",
    )
    model.build()
    return model


#: The registered plot hook: cross-attention heat-maps (per head) of a few test examples.
plots = attention_plots
