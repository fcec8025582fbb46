"""Sequence data stages (addition, dates, reverse, sort, arithmetic checks) and the
``tokenize`` stage.

The stage functions are in :mod:`dlpipe.stages.sequences.stage`, the generators in
:mod:`dlpipe.datasets.sequences`. This module declares the parameters and registers
``"module:function"`` strings, so importing it loads neither Keras nor TensorFlow.
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


@hookimpl
def register_stages(register):
    register("data", "seq_addition", "dlpipe.stages.sequences.stage:addition", AdditionParams,
             "Procedural addition problems ('535+61' -> '596'), character tokens.")
    register("data", "seq_dates", "dlpipe.stages.sequences.stage:dates", DatesParams,
             "Dates in mixed human formats -> ISO 'YYYY-MM-DD', character tokens.")
    register("data", "seq_reverse", "dlpipe.stages.sequences.stage:reverse", ReverseParams,
             "Random strings -> reversed (or copied), character tokens.")
    register("data", "seq_sort", "dlpipe.stages.sequences.stage:sort", SortParams,
             "Random strings -> their symbols sorted, character tokens.")
    register("data", "seq_arith_check", "dlpipe.stages.sequences.stage:arith_check", ArithCheckParams,
             "Right vs wrong equations ('35+61=96' / '35+61=97'), character tokens, "
             "balanced binary labels (text classification).")
    register("tokenize", "tokenizer", "dlpipe.stages.sequences.stage:tokenizer", TokenizerParams,
             "Re-tokenize sequence or text classification data (char or learned subword "
             "BPE); logs the vocabulary.",
             needs=("data",), provides=("data",))
