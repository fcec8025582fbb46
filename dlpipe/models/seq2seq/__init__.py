"""``seq2seq``: the RNN encoder-decoder, with or without attention.

The Keras code is in :mod:`dlpipe.models.seq2seq.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class Seq2SeqParams(Params):
    """RNN encoder-decoder with optional attention."""

    cell: Literal["simple_rnn", "lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    attention: Literal["none", "additive", "dot"] = Field(
        "additive", description="none, additive (Bahdanau) or dot (Luong) attention over "
        "the encoder outputs."
    )
    embedding_dim: int = Field(32, ge=1, description="Token embedding size.")
    units: int = Field(128, ge=1, description="RNN state size (encoder and decoder).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the softmax.")


@hookimpl
def register_models(register):
    register(
        "seq2seq",
        build="dlpipe.models.seq2seq.model:build",
        params=Seq2SeqParams,
        description="RNN encoder-decoder (SimpleRNN/LSTM/GRU), optional Bahdanau/Luong "
        "attention.",
        task="seq2seq",
        plots="dlpipe.models.seq2seq.model:plots",
        example_params={"cell": "gru", "attention": "additive", "embedding_dim": 8,
                        "units": 16},
        example_data="dlpipe.datasets.sequences:example_bundle",
    )
