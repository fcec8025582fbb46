"""A recurrent encoder-decoder (Sutskever et al., 2014) with optional attention.

The encoder embeds the source ids and runs an RNN (``simple_rnn``, ``lstm`` or
``gru``) over them, padding masked; its final state starts the decoder RNN, which
reads the target shifted right (teacher forcing in training, its own previous
outputs when decoding). With attention, every decoder output ``h_t`` attends over the
encoder outputs, skipping padding:

* ``additive``: Bahdanau et al. (2015) scores ``v^T tanh(W1 h_t + W2 s_j)``;
* ``dot``: Luong et al. (2015) scores ``h_t . s_j``;

and ``tanh(W [h_t; context_t])`` feeds the softmax over the target vocabulary (the
attentional hidden state of Luong et al.; both scores are placed after the decoder
RNN, so the recurrence itself stays a plain Keras RNN layer). Without attention the
decoder only sees the source through the encoder's final state, which is the
bottleneck attention removes on long inputs.

Decoding, metrics and heat-maps are shared with the transformer in
:mod:`dlpipe.models.decoding`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
from keras import layers, ops

from dlpipe.errors import DlpipeError
from dlpipe.models.attention import AdditiveAttention, DotProductAttention
from dlpipe.models.decoding import PAD_ID, EncoderDecoder, sequence_sizes
from dlpipe.models.decoding import plots as attention_plots
from dlpipe.models.seq2seq import Seq2SeqParams

if TYPE_CHECKING:
    from dlpipe.datasets.bundles import SeqBundle

CELLS = {"simple_rnn": layers.SimpleRNN, "lstm": layers.LSTM, "gru": layers.GRU}
ATTENTIONS = ("none", "additive", "dot")


@keras.saving.register_keras_serializable(package="dlpipe")
class Seq2Seq(EncoderDecoder):
    """RNN encoder-decoder; see the module docstring. ``encode`` returns
    ``(encoder_outputs, *final_states)``; ``decode`` returns ``(probabilities,
    attention weights (b, T, S) or None)``."""

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        source_length: int,
        target_length: int,
        cell: str = "lstm",
        attention: str = "additive",
        embedding_dim: int = 32,
        units: int = 128,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(source_vocab_size, target_vocab_size, source_length, target_length,
                         **kwargs)
        if cell not in CELLS:
            raise DlpipeError(f"seq2seq: cell must be one of {sorted(CELLS)}, not {cell!r}")
        if attention not in ATTENTIONS:
            raise DlpipeError(f"seq2seq: attention must be one of {ATTENTIONS}, not {attention!r}")
        self.cell = cell
        self.attention = attention
        self.embedding_dim = embedding_dim
        self.units = units
        self.dropout_rate = dropout
        rnn = CELLS[cell]
        self.source_embedding = layers.Embedding(source_vocab_size, embedding_dim,
                                                 name="source_embedding")
        self.target_embedding = layers.Embedding(target_vocab_size, embedding_dim,
                                                 name="target_embedding")
        self.encoder_rnn = rnn(units, return_sequences=True, return_state=True,
                               name="encoder_rnn")
        self.decoder_rnn = rnn(units, return_sequences=True, return_state=True,
                               name="decoder_rnn")
        self.attention_layer: Any = None
        if attention == "additive":
            self.attention_layer = AdditiveAttention(units, name="attention")
        elif attention == "dot":
            self.attention_layer = DotProductAttention(name="attention")
        self.combine = (
            layers.Dense(units, activation="tanh", name="attentional_state")
            if self.attention_layer is not None else None
        )
        self.dropout_layer = layers.Dropout(dropout, name="dropout")
        self.output_layer = layers.Dense(target_vocab_size, activation="softmax",
                                         dtype="float32", name="next_token")

    def encode(self, encoder_ids: Any, training: bool | None = None) -> Any:
        mask = ops.not_equal(encoder_ids, PAD_ID)
        x = self.source_embedding(encoder_ids)
        outputs, *states = self.encoder_rnn(x, mask=mask, training=training)
        return (outputs, *states)

    def decode(
        self, memory: Any, encoder_ids: Any, decoder_ids: Any, training: bool | None = None
    ) -> tuple[Any, Any]:
        encoder_outputs, *states = memory
        y = self.target_embedding(decoder_ids)
        h = self.decoder_rnn(y, initial_state=list(states), training=training)[0]
        weights = None
        if self.attention_layer is not None and self.combine is not None:
            mask = ops.not_equal(encoder_ids, PAD_ID)
            context, weights = self.attention_layer((h, encoder_outputs), mask=mask)
            h = self.combine(ops.concatenate([h, ops.cast(context, h.dtype)], axis=-1))
        h = self.dropout_layer(h, training=training)
        return self.output_layer(h), weights

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "cell": self.cell,
            "attention": self.attention,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "dropout": self.dropout_rate,
        }


def build(params: Seq2SeqParams, data: SeqBundle) -> Seq2Seq:
    """The registered builder: a built, uncompiled :class:`Seq2Seq` for ``data``'s
    vocabularies and lengths."""
    model = Seq2Seq(
        **sequence_sizes("seq2seq", data),
        cell=params.cell,
        attention=params.attention,
        embedding_dim=params.embedding_dim,
        units=params.units,
        dropout=params.dropout,
        name="seq2seq",
    )
    model.build()
    return model


#: The registered plot hook: attention heat-maps of a few test examples.
plots = attention_plots
