"""Vocabularies and token ids, shared by the data stages and the models.

Ids 0-3 are the special tokens ``PAD``, ``START``, ``END`` and ``UNK`` in every
vocabulary. A :class:`Vocabulary` splits text into characters, or into subwords by
byte-pair encoding (:func:`learn_bpe`); a :class:`WordVocabulary` splits on whitespace.
NumPy only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dlpipe.errors import DlpipeError

PAD, START, END, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3


@dataclass
class Vocabulary:
    """Token strings by id; ids 0-3 are ``PAD``, ``START``, ``END`` and ``UNK``.

    ``level`` is ``char`` (one token per character) or ``subword`` (byte-pair
    encoding: characters merged by the learned ``merges``, applied in order).
    """

    tokens: list[str]
    level: str = "char"
    merges: list[tuple[str, str]] = field(default_factory=list)
    #: What :meth:`decode` puts between tokens (word vocabularies use a space).
    separator: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with the special tokens {SPECIALS}")
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self._cache: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        """``text`` as token strings (before the id lookup)."""
        if self.level == "char" or not self.merges:
            return list(text)
        cached = self._cache.get(text)
        if cached is None:
            cached = _apply_merges(list(text), self._ranks)
            self._cache[text] = cached
        return cached

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; unknown symbols become ``UNK``."""
        return [self.index.get(t, UNK_ID) for t in self.split(text)]

    def token_strings(self, ids: Iterable[int], stop_at_end: bool = True) -> list[str]:
        """Token strings of ``ids`` without padding, stopping after ``END``."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == PAD_ID:
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
            if stop_at_end and i == END_ID:
                break
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: up to the first ``END``, special tokens dropped."""
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            parts.append("?" if i == UNK_ID or i >= len(self.tokens) else self.tokens[i])
        return self.separator.join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "tokens": list(self.tokens),
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(list(data["tokens"]), data.get("level", "char"),
                   [(a, b) for a, b in data.get("merges", [])])


def char_vocabulary(texts: Iterable[str]) -> Vocabulary:
    """Every character of ``texts``, sorted, after the special tokens."""
    chars = sorted({c for t in texts for c in t})
    return Vocabulary([*SPECIALS, *chars], "char")


def learn_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int = 2) -> Vocabulary:
    """A byte-pair-encoding vocabulary learned from ``texts`` (Sennrich et al., 2016).

    Starts from the characters and repeatedly merges the most frequent adjacent pair
    of symbols (ties broken alphabetically, so the result is deterministic) until
    the vocabulary has ``vocab_size`` tokens or no pair occurs ``min_frequency`` times.
    Whole strings are the units (spaces are ordinary symbols).
    """
    base = char_vocabulary(texts)
    counts = Counter(texts)
    words: dict[str, list[str]] = {t: list(t) for t in counts}
    tokens = list(base.tokens)
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for text, symbols in words.items():
            n = counts[text]
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best, freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < min_frequency:
            break
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in tokens:
            tokens.append(merged)
        for text, symbols in words.items():
            words[text] = _merge_pair(symbols, best)
    return Vocabulary(tokens, "subword", merges)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE encoding: merge the adjacent pair learned earliest until none is left."""
    while len(symbols) > 1:
        candidates = [
            (ranks[p], p) for p in zip(symbols, symbols[1:], strict=False) if p in ranks
        ]
        if not candidates:
            break
        symbols = _merge_pair(symbols, min(candidates)[1])
    return symbols


def make_vocabulary(
    texts: Sequence[str], level: str = "char", vocab_size: int = 64, min_frequency: int = 2
) -> Vocabulary:
    if level == "char":
        return char_vocabulary(texts)
    if level == "subword":
        return learn_bpe(texts, vocab_size, min_frequency)
    raise DlpipeError(f"unknown tokenizer level {level!r} (char or subword)")


@dataclass
class WordVocabulary(Vocabulary):
    """A :class:`Vocabulary` whose tokens are words (split on whitespace);
    :meth:`decode` joins them with single spaces."""

    level: str = "word"
    separator: ClassVar[str] = " "

    def split(self, text: str) -> list[str]:
        return text.split()


def word_vocabulary(texts: Iterable[str]) -> WordVocabulary:
    """Every word of ``texts``, sorted, after the special tokens."""
    words = sorted({w for t in texts for w in t.split()})
    return WordVocabulary([*SPECIALS, *words], "word")


def vocabulary_from_dict(doc: dict[str, Any]) -> Vocabulary:
    """A vocabulary from its ``to_dict()`` form: a :class:`WordVocabulary` for level
    ``word``, else a :class:`Vocabulary`."""
    if doc.get("level") == "word":
        return WordVocabulary(list(doc["tokens"]), "word")
    return Vocabulary.from_dict(doc)


def encode_texts(texts: Sequence[str], vocab: Vocabulary, length: int, end: bool) -> np.ndarray:
    """``(n, length)`` int32 ids, right-padded; ``end`` appends ``END`` to each."""
    out = np.full((len(texts), length), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = vocab.encode(text) + ([END_ID] if end else [])
        if len(ids) > length:
            raise DlpipeError(f"{text!r} has {len(ids)} tokens, more than the length {length}")
        out[row, : len(ids)] = ids
    return out
