"""Sequence plugins: procedural text-pair datasets, a tokenizer stage, the ``seq2seq``
(RNN) and ``transformer`` architectures and the ``seq2seq_report`` evaluation stage;
and for text classification the ``seq_arith_check`` data stage and the
``transformer_classifier`` architecture (a transformer encoder with a softmax head).

Implementations live in :mod:`dlpipe.datasets.sequences`,
:mod:`dlpipe.stages.reports.seq2seq`, :mod:`dlpipe.models.seq2seq.model`,
:mod:`dlpipe.models.transformer.model` and :mod:`dlpipe.models.text_classifier.model`; nothing
heavy is imported here.

Tokenization: every ``seq_*`` data stage already produces character-level token ids
(and logs its vocabulary as the ``vocab`` artifact), so ``data -> model -> train``
works on its own. An optional ``kind: tokenize, use: tokenizer`` stage right after
the data stage re-tokenizes the same texts, e.g. with a learned subword (BPE)
vocabulary, and logs that vocabulary instead.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params

DateFormat = Literal[
    "d_month_y", "mon_d_y", "y/m/d", "d.m.y", "month_d_y", "weekday_d_month_y", "d-mon-y",
    "m/d/y",
]


class SeqDataParams(Params):
    """Shared by the procedural sequence datasets."""

    n: int = Field(10000, ge=10, description="Number of distinct examples generated.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share for validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share for testing.")
    seed: int | None = Field(
        None, description="Generation and split seed. Default: the pipeline's seed."
    )

    @model_validator(mode="after")
    def _fractions(self) -> SeqDataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class AdditionParams(SeqDataParams):
    """'535+61' -> '596'."""

    digits: int = Field(3, ge=1, le=9, description="Most digits of each operand.")


class DatesParams(SeqDataParams):
    """A date in a human format -> 'YYYY-MM-DD'."""

    formats: list[DateFormat] = Field(
        default_factory=lambda: list(get_args(DateFormat)),
        min_length=1,
        description="Input formats mixed in the data, e.g. d_month_y '23 November 2026', "
        "mon_d_y 'nov 23, 2026', y/m/d '2026/11/23', weekday_d_month_y "
        "'Monday, 23 November 2026'.",
    )
    start_year: int = Field(1950, ge=1, le=9999, description="First year of the dates.")
    end_year: int = Field(2049, ge=1, le=9999, description="Last year of the dates.")
    mixed_case: bool = Field(True, description="Sometimes write a source all lower/upper case.")
    filler_words: int = Field(
        0, ge=0, le=20, description="Append 0..N filler words to each source ('23 November "
        "2026, please note the meeting'): longer inputs with no more information, which an "
        "encoder-decoder without attention must carry through (0: plain dates)."
    )

    @model_validator(mode="after")
    def _years(self) -> DatesParams:
        if self.end_year < self.start_year:
            raise ValueError("end_year must not be before start_year")
        return self


class SymbolsParams(SeqDataParams):
    alphabet: str = Field("abcdefghij", min_length=1, description="Symbols of the strings.")
    min_length: int = Field(3, ge=1, description="Shortest string.")
    max_length: int = Field(10, ge=1, description="Longest string.")

    @model_validator(mode="after")
    def _lengths(self) -> SymbolsParams:
        if self.max_length < self.min_length:
            raise ValueError("max_length must not be below min_length")
        return self


class ReverseParams(SymbolsParams):
    """'abcd' -> 'dcba' (or a plain copy)."""

    reverse: bool = Field(True, description="False: the target is an unchanged copy.")


class SortParams(SymbolsParams):
    """'31412' -> '11234'."""

    alphabet: str = Field("0123456789", min_length=1, description="Symbols, in sort order.")


class ArithCheckParams(SeqDataParams):
    """'35+61=96' -> correct, '35+61=97' -> wrong (balanced classes)."""

    digits: int = Field(2, ge=1, le=6, description="Most digits of each operand.")
    operators: str = Field(
        "+", pattern=r"^[-+*]+$", description="Operators mixed in the data, from '+-*'."
    )
    off_by: int = Field(
        3, ge=1, description="A wrong result is off by 1..off_by (when not digit-swapped)."
    )
    swap_fraction: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Share of wrong results made by swapping two adjacent digits of the "
        "right result ('96' -> '69').",
    )


class TokenizerParams(Params):
    """Re-tokenize the texts of the data stage (sequence pairs, or the texts of a text
    classification stage): characters or a learned subword vocabulary."""

    level: Literal["char", "subword"] = Field(
        "subword", description="char: one token per character; subword: byte-pair encoding "
        "learned on the training split."
    )
    vocab_size: int = Field(
        64, ge=8, description="subword: largest vocabulary per side (special tokens included)."
    )
    min_frequency: int = Field(2, ge=1, description="subword: rarest pair still merged.")
    apply_to: Literal["both", "source", "target"] = Field(
        "both", description="Which side gets the subword vocabulary (the other stays char). "
        "Text classification data has source texts only: both or source."
    )


class Seq2SeqReportParams(Params):
    """Greedy decoding of a split, sequence metrics, examples and attention maps."""

    split: Literal["test", "val", "train"] = Field("test", description="Split to decode.")
    batch_size: int = Field(256, ge=1, description="Decoding batch size.")
    beam_width: int = Field(
        0, ge=0, description="Also decode with beam search of this width (0: skip); logs "
        "<split>_beam_sequence_accuracy."
    )
    examples: int = Field(20, ge=0, description="Rows of the examples table (examples.md).")
    attention_maps: bool = Field(True, description="Log the model's attention heat-maps.")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")
    length_bucket_width: int = Field(
        5, ge=1, description="Source lengths (tokens) per bucket of the "
        "<split>_seq_acc_len_<lo>_<hi> metrics; buckets are aligned to multiples of it."
    )
    length_buckets: list[int] | None = Field(
        None, min_length=1, description="Explicit bucket lower bounds instead, e.g. [0, 15, 20] "
        "for lengths 0-14, 15-19 and 20 and longer."
    )


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


class TransformerParams(Params):
    """Transformer encoder-decoder."""

    d_model: int = Field(64, ge=2, description="Model width.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    encoder_layers: int = Field(2, ge=1, description="Encoder blocks.")
    decoder_layers: int = Field(2, ge=1, description="Decoder blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Residual and embedding dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Positional encodings: fixed sinusoids or learned embeddings."
    )

    @model_validator(mode="after")
    def _heads(self) -> TransformerParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


class TransformerClassifierParams(Params):
    """Transformer encoder over token ids, pooled to a softmax classifier."""

    d_model: int = Field(64, ge=2, description="Model width.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    num_layers: int = Field(2, ge=1, description="Encoder blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Embedding, residual and head "
                           "dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Positional encodings: fixed sinusoids or learned embeddings."
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="cls: the final vector of a [cls] token put in front; mean: the "
        "average over the real (non-padding) tokens."
    )

    @model_validator(mode="after")
    def _heads(self) -> TransformerClassifierParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self




@hookimpl
def register_stages(register):
    register("data", "seq_addition", "dlpipe.datasets.sequences:addition", AdditionParams,
             "Procedural addition problems ('535+61' -> '596'), character tokens.")
    register("data", "seq_dates", "dlpipe.datasets.sequences:dates", DatesParams,
             "Dates in mixed human formats -> ISO 'YYYY-MM-DD', character tokens.")
    register("data", "seq_reverse", "dlpipe.datasets.sequences:reverse", ReverseParams,
             "Random strings -> reversed (or copied), character tokens.")
    register("data", "seq_sort", "dlpipe.datasets.sequences:sort", SortParams,
             "Random strings -> their symbols sorted, character tokens.")
    register("data", "seq_arith_check", "dlpipe.datasets.sequences:arith_check", ArithCheckParams,
             "Right vs wrong equations ('35+61=96' / '35+61=97'), character tokens, "
             "balanced binary labels (text classification).")
    register("tokenize", "tokenizer", "dlpipe.datasets.sequences:tokenizer", TokenizerParams,
             "Re-tokenize sequence or text classification data (char or learned subword "
             "BPE); logs the vocabulary.",
             needs=("data",), provides=("data",))
    register("evaluate", "seq2seq_report", "dlpipe.stages.reports.seq2seq:seq2seq_report",
             Seq2SeqReportParams,
             "Greedy (and beam) decoding: sequence/token accuracy, examples, attention maps.")


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
    register(
        "transformer",
        build="dlpipe.models.transformer.model:build",
        params=TransformerParams,
        description="Transformer encoder-decoder with sinusoidal or learned positions.",
        task="seq2seq",
        plots="dlpipe.models.transformer.model:plots",
        example_params={"d_model": 16, "num_heads": 2, "ff_dim": 32, "encoder_layers": 1,
                        "decoder_layers": 1},
        example_data="dlpipe.datasets.sequences:example_bundle",
    )
    register(
        "transformer_classifier",
        build="dlpipe.models.text_classifier.model:build",
        params=TransformerClassifierParams,
        description="Transformer encoder text classifier: [cls] or mean pooling, padding "
        "masked, sinusoidal or learned positions.",
        task="classification",
        plots="dlpipe.models.text_classifier.model:plots",
        example_params={"d_model": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
        example_data="dlpipe.datasets.sequences:arith_example_bundle",
    )
