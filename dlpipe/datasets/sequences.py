"""Procedural sequence-to-sequence datasets, tokenizers and the sequence data bundle.

Four tasks, each generated deterministically from a seed (no network, no files):

* ``addition``: ``"535+61"`` -> ``"596"``;
* ``dates``: a date in one of several human formats (``"23 November 2026"``,
  ``"nov 23, 2026"``, ``"2026/11/23"``, ...) -> its ISO form ``"2026-11-23"``;
* ``reverse``: ``"hello"`` -> ``"olleh"`` (or an unchanged copy);
* ``sort``: ``"31412"`` -> ``"11234"``.

and one text *classification* task, ``arith_check``: is ``"35+61=96"`` right (class
``correct``) or ``"35+61=97"`` wrong (a :class:`TextClassBundle` of character ids and
labels, for the ``transformer_classifier`` architecture).

Text becomes token ids here, in the data stage: a :class:`Vocabulary` is learned from
the training split, character level by default or as a byte-pair-encoding subword
vocabulary (:func:`learn_bpe`, used by the ``tokenize`` stage). The result is a
:class:`SeqBundle`: ``x[split]`` are the encoder's token ids ``(n, source_length)``
and ``y[split]`` the target ids ``(n, target_length)``, each target ending in
``END`` and padded with ``PAD`` (id 0). Teacher forcing needs the target shifted
right behind a ``START`` token as a second input; :meth:`SeqBundle.dataset` adds it
in the input pipeline (see there), so ``x``/``y`` stay plain arrays.

NumPy only; TensorFlow is imported inside :meth:`SeqBundle.dataset`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dlpipe.data import SPLITS, DataBundle
from dlpipe.datacheck import check_split
from dlpipe.errors import DlpipeError

PAD, START, END, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

Pairs = tuple[list[str], list[str]]

# --------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------


@dataclass
class SeqBundle(DataBundle):
    """A :class:`DataBundle` of token ids for sequence-to-sequence models.

    ``x[split]``: int32 encoder ids ``(n, source_length)``, right-padded with 0.
    ``y[split]``: int32 target ids ``(n, target_length)``: the target's tokens, ``END``,
    then padding. ``texts[split]`` keeps the raw ``(sources, targets)`` strings (for
    re-tokenizing and reports); the vocabularies decode ids back to text.
    """

    source_vocab: Vocabulary | None = None
    target_vocab: Vocabulary | None = None
    texts: dict[str, Pairs] = field(default_factory=dict)
    #: Weight padding positions 0 in the loss (``dataset`` yields per-token weights).
    mask_padding: bool = True

    @property
    def source_length(self) -> int:
        return int(self.x["train"].shape[1])

    @property
    def target_length(self) -> int:
        return int(self.y["train"].shape[1])  # type: ignore[union-attr]

    def describe(self) -> dict[str, Any]:
        assert self.source_vocab is not None and self.target_vocab is not None
        return {
            **super().describe(),
            "task": self.task,
            "source_length": self.source_length,
            "target_length": self.target_length,
            "source_vocab_size": self.source_vocab.size,
            "target_vocab_size": self.target_vocab.size,
            "tokenizer": self.source_vocab.level,
        }

    @staticmethod
    def decoder_inputs(y: np.ndarray) -> np.ndarray:
        """Teacher forcing: the target shifted right one step behind ``START``."""
        start = np.full((len(y), 1), START_ID, dtype=np.int32)
        return np.concatenate([start, y[:, :-1]], axis=1).astype(np.int32)

    def examples(self, split: str) -> Any:
        """``({"encoder_inputs", "decoder_inputs"}, y, weights)`` per example.

        ``decoder_inputs`` is ``y`` shifted right behind ``START`` (teacher forcing);
        ``weights`` are 1 on the target's tokens and its ``END`` and 0 on padding (all
        1 when ``mask_padding`` is off). A split without targets yields the encoder
        ids alone. Augment stages work on images, so sequence bundles have none.
        """
        x = np.asarray(self.x[split], dtype=np.int32)
        y = self.y.get(split)
        if y is None:
            return x
        y = np.asarray(y, dtype=np.int32)
        inputs = {"encoder_inputs": x, "decoder_inputs": self.decoder_inputs(y)}
        weights = (y != PAD_ID) if self.mask_padding else np.ones_like(y, dtype=bool)
        return inputs, y, weights.astype(np.float32)


def encode_texts(texts: Sequence[str], vocab: Vocabulary, length: int, end: bool) -> np.ndarray:
    """``(n, length)`` int32 ids, right-padded; ``end`` appends ``END`` to each."""
    out = np.full((len(texts), length), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = vocab.encode(text) + ([END_ID] if end else [])
        if len(ids) > length:
            raise DlpipeError(f"{text!r} has {len(ids)} tokens, more than the length {length}")
        out[row, : len(ids)] = ids
    return out


def build_bundle(
    name: str,
    texts: dict[str, Pairs],
    source_vocab: Vocabulary,
    target_vocab: Vocabulary,
) -> SeqBundle:
    """Tokenize every split with the given vocabularies (lengths: the longest text)."""
    src_len = max(len(source_vocab.encode(s)) for src, _ in texts.values() for s in src)
    tgt_len = 1 + max(len(target_vocab.encode(t)) for _, tgt in texts.values() for t in tgt)
    xs = {s: encode_texts(texts[s][0], source_vocab, src_len, end=False) for s in SPLITS}
    ys: dict[str, np.ndarray | None] = {
        s: encode_texts(texts[s][1], target_vocab, tgt_len, end=True) for s in SPLITS
    }
    return SeqBundle(
        x=xs, y=ys, task="seq2seq", name=name,
        source_vocab=source_vocab, target_vocab=target_vocab, texts=texts,
    )


def tokenize(
    name: str,
    texts: dict[str, Pairs],
    level: str = "char",
    vocab_size: int = 64,
    min_frequency: int = 2,
    apply_to: str = "both",
) -> SeqBundle:
    """Learn vocabularies from the training split and tokenize every split."""
    sources, targets = texts["train"]
    src_level = level if apply_to in ("both", "source") else "char"
    tgt_level = level if apply_to in ("both", "target") else "char"
    src_vocab = make_vocabulary(sources, src_level, vocab_size, min_frequency)
    tgt_vocab = make_vocabulary(targets, tgt_level, vocab_size, min_frequency)
    return build_bundle(name, texts, src_vocab, tgt_vocab)


def save_vocabularies(bundle: SeqBundle, path: Path) -> Path:
    """Write ``{"source": ..., "target": ...}`` vocabularies as JSON."""
    assert bundle.source_vocab is not None and bundle.target_vocab is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "special_tokens": {"pad": PAD_ID, "start": START_ID, "end": END_ID, "unk": UNK_ID},
        "source": bundle.source_vocab.to_dict(),
        "target": bundle.target_vocab.to_dict(),
    }
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def load_vocabularies(path: str | Path) -> tuple[Vocabulary, Vocabulary]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return Vocabulary.from_dict(doc["source"]), Vocabulary.from_dict(doc["target"])


# --------------------------------------------------------------------------------------
# Generators: (sources, targets) from a seeded numpy Generator
# --------------------------------------------------------------------------------------


def _unique(
    n: int, draw: Callable[[], tuple[str, str]], capacity: int | None, what: str
) -> Pairs:
    """``n`` pairs with distinct sources (no example is in two splits)."""
    if capacity is not None and n > capacity:
        raise DlpipeError(f"{what}: asked for {n} distinct examples, only {capacity} exist")
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise DlpipeError(f"{what}: could not draw {n} distinct examples; lower n")
        source, target = draw()
        seen.setdefault(source, target)
    return list(seen), list(seen.values())


def addition_pairs(n: int, digits: int = 3, seed: int = 0) -> Pairs:
    """``"a+b"`` -> ``"a+b"`` evaluated; ``a`` and ``b`` have 1..``digits`` digits."""
    rng = np.random.default_rng(seed)

    def number() -> int:
        length = int(rng.integers(1, digits + 1))
        return int(rng.integers(0, 10**length))

    def draw() -> tuple[str, str]:
        a, b = number(), number()
        return f"{a}+{b}", str(a + b)

    return _unique(n, draw, (10**digits) ** 2, "addition")


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

#: Input date formats: name -> (formatter, ``strptime`` pattern that reads it back).
DATE_FORMATS: dict[str, tuple[Callable[[dt.date], str], str]] = {
    "d_month_y": (lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}", "%d %B %Y"),
    "mon_d_y": (lambda d: f"{MONTHS[d.month - 1][:3].lower()} {d.day}, {d.year}", "%b %d, %Y"),
    "y/m/d": (lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}", "%Y/%m/%d"),
    "d.m.y": (lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}", "%d.%m.%Y"),
    "month_d_y": (lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}", "%B %d, %Y"),
    "weekday_d_month_y": (
        lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
        "%A, %d %B %Y",
    ),
    "d-mon-y": (lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3]}-{d.year}", "%d-%b-%Y"),
    "m/d/y": (lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}", "%m/%d/%Y"),
}


def format_date(date: dt.date, fmt: str) -> str:
    return DATE_FORMATS[fmt][0](date)


def parse_date(text: str) -> dt.date:
    """Read back a date written in any of :data:`DATE_FORMATS` (any letter case)."""
    for _, pattern in DATE_FORMATS.values():
        try:
            parsed = dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
        if "%A" in pattern and WEEKDAYS[parsed.weekday()].lower() != text.split(",")[0].lower():
            continue
        return parsed
    raise ValueError(f"not a date in a known format: {text!r}")


def date_pairs(
    n: int,
    formats: Sequence[str] = tuple(DATE_FORMATS),
    start_year: int = 1950,
    end_year: int = 2049,
    mixed_case: bool = True,
    seed: int = 0,
) -> Pairs:
    """A date in a randomly chosen input format -> ``YYYY-MM-DD``.

    With ``mixed_case`` the letters of a source are sometimes all lower or all upper
    case. Dates are uniform between 1 January ``start_year`` and 31 December
    ``end_year``.
    """
    unknown = [f for f in formats if f not in DATE_FORMATS]
    if unknown or not formats:
        raise DlpipeError(f"unknown date format(s) {unknown}; known: {list(DATE_FORMATS)}")
    rng = np.random.default_rng(seed)
    first = dt.date(start_year, 1, 1).toordinal()
    days = dt.date(end_year, 12, 31).toordinal() - first + 1
    fmts = list(formats)

    def draw() -> tuple[str, str]:
        date = dt.date.fromordinal(first + int(rng.integers(0, days)))
        text = format_date(date, fmts[int(rng.integers(0, len(fmts)))])
        if mixed_case:
            case = int(rng.integers(0, 4))
            text = text.lower() if case == 1 else text.upper() if case == 2 else text
        return text, date.isoformat()

    return _unique(n, draw, None, "dates")


def reverse_pairs(
    n: int, alphabet: str = "abcdefghij", min_length: int = 3, max_length: int = 10,
    reverse: bool = True, seed: int = 0,
) -> Pairs:
    """A random string -> the same string reversed (or unchanged with ``reverse=False``)."""
    rng = np.random.default_rng(seed)
    capacity = sum(len(alphabet) ** k for k in range(min_length, max_length + 1))

    def draw() -> tuple[str, str]:
        length = int(rng.integers(min_length, max_length + 1))
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))
        return text, text[::-1] if reverse else text

    return _unique(n, draw, capacity, "reverse")


def sort_pairs(
    n: int, alphabet: str = "0123456789", min_length: int = 3, max_length: int = 10,
    seed: int = 0,
) -> Pairs:
    """A random string -> its characters in alphabet order."""
    rng = np.random.default_rng(seed)
    order = {c: i for i, c in enumerate(alphabet)}
    capacity = sum(len(alphabet) ** k for k in range(min_length, max_length + 1))

    def draw() -> tuple[str, str]:
        length = int(rng.integers(min_length, max_length + 1))
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))
        return text, "".join(sorted(text, key=order.__getitem__))

    return _unique(n, draw, capacity, "sort")


def _pair_split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many of ``n`` pairs :func:`split_pairs` puts in each split (rounded)."""
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    return {"train": max(n - n_test - n_val, 0), "val": n_val, "test": n_test}


def split_pairs(
    pairs: Pairs, val_fraction: float, test_fraction: float, seed: int, *, name: str = "pairs"
) -> dict[str, Pairs]:
    """A seeded shuffle, then test, val and train parts (``name`` starts error messages)."""
    sources, targets = pairs
    n = len(sources)
    check_split(name, n, val_fraction, test_fraction, sizes=_pair_split_sizes)
    order = np.random.default_rng(seed + 1).permutation(n)
    sizes = _pair_split_sizes(n, val_fraction, test_fraction)
    n_test, n_val = sizes["test"], sizes["val"]
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val],
             "train": order[n_test + n_val :]}
    return {
        s: ([sources[i] for i in parts[s]], [targets[i] for i in parts[s]]) for s in SPLITS
    }


def example_bundle(n: int = 80, seed: int = 0) -> SeqBundle:
    """A tiny character-level reversal bundle (strings of 2-5 of 'abcd') for
    conformance tests of sequence architectures."""
    pairs = reverse_pairs(n, "abcd", 2, 5, seed=seed)
    return tokenize("example_reverse", split_pairs(pairs, 0.1, 0.1, seed))


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def _seed(ctx: Any, params: Any) -> int:
    return int(params.seed if params.seed is not None else ctx.seed)


def _finish(ctx: Any, params: Any, name: str, pairs: Pairs) -> SeqBundle:
    texts = split_pairs(pairs, params.val_fraction, params.test_fraction, _seed(ctx, params),
                        name=name)
    bundle = tokenize(name, texts)
    _publish(ctx, bundle)
    return bundle


def _publish(ctx: Any, bundle: SeqBundle) -> None:
    """Set ``ctx.data``, log the vocabularies and print a summary with examples."""
    ctx.data = bundle
    ctx.extras["data"] = bundle.describe()
    path = save_vocabularies(bundle, Path(ctx.run_dir) / "vocab" / "vocab.json")
    ctx.log_artifact(path, "vocab")
    assert bundle.source_vocab is not None and bundle.target_vocab is not None
    sizes = "/".join(str(bundle.size(s)) for s in SPLITS)
    sources, targets = bundle.texts["train"]
    examples = ", ".join(f"{s!r} -> {t!r}" for s, t in zip(sources[:2], targets[:2], strict=False))
    print(
        f"data: {bundle.name} {sizes} train/val/test, {bundle.source_vocab.level} tokens, "
        f"vocab {bundle.source_vocab.size}/{bundle.target_vocab.size} (source/target), "
        f"lengths {bundle.source_length}/{bundle.target_length}; e.g. {examples}"
    )


def addition(ctx: Any, params: Any) -> None:
    pairs = addition_pairs(params.n, params.digits, _seed(ctx, params))
    _finish(ctx, params, "addition", pairs)


def dates(ctx: Any, params: Any) -> None:
    pairs = date_pairs(params.n, params.formats, params.start_year, params.end_year,
                       params.mixed_case, _seed(ctx, params))
    filler = getattr(params, "filler_words", 0)
    if filler:
        pairs = add_filler_words(pairs, filler, _seed(ctx, params))
    _finish(ctx, params, "dates", pairs)


def reverse(ctx: Any, params: Any) -> None:
    pairs = reverse_pairs(params.n, params.alphabet, params.min_length, params.max_length,
                          params.reverse, _seed(ctx, params))
    _finish(ctx, params, "reverse" if params.reverse else "copy", pairs)


def sort(ctx: Any, params: Any) -> None:
    pairs = sort_pairs(params.n, params.alphabet, params.min_length, params.max_length,
                       _seed(ctx, params))
    _finish(ctx, params, "sort", pairs)


def tokenizer(ctx: Any, params: Any) -> None:
    """Re-tokenize the texts of the data stage before it (char or subword): the pairs
    of a sequence-to-sequence bundle, or the texts of a text classification bundle."""
    data = ctx.data
    if isinstance(data, TextClassBundle) and data.texts:
        if params.apply_to == "target":
            raise DlpipeError(
                f"stage {ctx.stage.id!r}: apply_to: target re-tokenizes target texts, but "
                f"{data.name!r} is text classification data, which has none; use "
                "apply_to: source (or both)"
            )
        vocab = make_vocabulary(data.texts["train"], params.level, params.vocab_size,
                                params.min_frequency)
        parts = {s: (data.texts[s], [int(v) for v in np.asarray(data.y[s])]) for s in SPLITS}
        publish_text_classes(ctx, text_class_bundle(data.name, parts, data.class_names, vocab))
        return
    if not isinstance(data, SeqBundle) or not data.texts:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: the tokenizer needs a data stage of texts before it "
            "(seq_addition, seq_dates, seq_reverse, seq_sort, seq_arith_check or "
            "text_directory)"
        )
    bundle = tokenize(data.name, data.texts, params.level, params.vocab_size,
                      params.min_frequency, params.apply_to)
    bundle.mask_padding = data.mask_padding
    _publish(ctx, bundle)


FILLER_WORDS = ("please", "note", "the", "meeting", "is", "set", "for", "that", "day",
                "our", "team", "will", "call", "you", "then", "thanks", "again", "see",
                "soon", "and", "all", "good", "as", "agreed", "with")


def add_filler_words(pairs: Pairs, most: int, seed: int = 0) -> Pairs:
    """Sources with 0..``most`` filler words appended (``"23 November 2026, please note
    the meeting"``); targets unchanged.

    The words carry no date information, so a source gets longer without getting
    harder to read for a model that can look back at it (attention), while an encoder
    that squeezes the source into its final state must carry the date across them.
    The words follow a source's letter case (all lower or upper case stays so).
    """
    rng = np.random.default_rng([seed, 1013])
    sources, targets = pairs
    out = []
    for source in sources:
        count = int(rng.integers(0, most + 1))
        if not count:
            out.append(source)
            continue
        words = " ".join(FILLER_WORDS[int(i)] for i in rng.integers(0, len(FILLER_WORDS), count))
        words = words.upper() if source.isupper() else words
        out.append(f"{source}, {words}")
    return out, list(targets)


# --------------------------------------------------------------------------------------
# Text classification: is the arithmetic right? ("35+61=96" vs "35+61=97")
# --------------------------------------------------------------------------------------

#: Class names of ``seq_arith_check``: label 1 means the equation is right.
ARITH_CLASSES = ["wrong", "correct"]


@dataclass
class TextClassBundle(DataBundle):
    """A :class:`DataBundle` of token ids with one class label per text.

    ``x[split]``: int32 ids ``(n, length)``, right-padded with ``PAD`` (0);
    ``y[split]``: int32 labels ``(n,)``; ``texts[split]`` the raw strings;
    ``vocab`` maps ids back to tokens. The generic :meth:`DataBundle.dataset` yields
    ``(ids, label)`` batches, so the usual ``keras_fit`` / ``classifier_report`` stages
    work on it unchanged.
    """

    vocab: Vocabulary | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def source_vocab(self) -> Vocabulary | None:
        """The vocabulary under the name sequence code looks for."""
        return self.vocab

    @property
    def sequence_length(self) -> int:
        return int(self.x["train"].shape[1])

    def describe(self) -> dict[str, Any]:
        assert self.vocab is not None
        return {
            **super().describe(),
            "task": self.task,
            "sequence_length": self.sequence_length,
            "vocab_size": self.vocab.size,
            "tokenizer": self.vocab.level,
        }


def arith_value(a: int, b: int, op: str) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r} (one of + - *)")


def check_equation(text: str) -> bool:
    """Whether ``"a<op>b=c"`` holds (``op`` one of ``+ - *``; ``c`` may be negative)."""
    left, right = text.split("=")
    for i, ch in enumerate(left):
        if i > 0 and ch in "+-*":
            return arith_value(int(left[:i]), int(left[i + 1 :]), ch) == int(right)
    raise ValueError(f"no operator in {text!r}")


def _swap_digits(value: int, rng: np.random.Generator) -> int | None:
    """``value`` with two adjacent digits swapped, or None if no swap changes it."""
    sign, digits = ("-", str(-value)) if value < 0 else ("", str(value))
    spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
    if not spots:
        return None
    i = spots[int(rng.integers(len(spots)))]
    swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
    if swapped[0] == "0" and len(swapped) > 1:  # "05" is not how results are written
        return None
    return int(sign + swapped)


def arith_check_examples(
    n: int,
    digits: int = 2,
    operators: str = "+",
    off_by: int = 3,
    swap_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """``n`` distinct equations ``"a<op>b=c"`` and labels (1: ``c`` is right, 0: wrong).

    Exactly ``n // 2`` (rounded up) are wrong, in a seeded random order. A wrong ``c``
    is the right result with two adjacent digits swapped (share ``swap_fraction``, when a
    swap changes it) or otherwise off by 1..``off_by`` either way, so the model has to
    check the arithmetic, not spot implausible numbers. Operands have 1..``digits``
    digits.
    """
    if not operators or any(op not in "+-*" for op in operators):
        raise DlpipeError(f"seq_arith_check: operators must be made of + - *, got {operators!r}")
    rng = np.random.default_rng(seed)
    labels = np.random.default_rng(seed + 7).permutation(np.arange(n) % 2)
    capacity = (10**digits) ** 2 * len(set(operators))
    if int(labels.sum()) > capacity:
        raise DlpipeError(
            f"seq_arith_check: {int(labels.sum())} distinct right equations asked for, only "
            f"{capacity} exist with {digits} digit(s) and operators {operators!r}; lower n"
        )

    def number() -> int:
        length = int(rng.integers(1, digits + 1))
        return int(rng.integers(0, 10**length))

    def equation(correct: bool) -> str:
        a, b = number(), number()
        op = operators[int(rng.integers(len(operators)))]
        result = arith_value(a, b, op)
        if not correct:
            wrong = _swap_digits(result, rng) if rng.random() < swap_fraction else None
            if wrong is None:
                delta = int(rng.integers(1, off_by + 1))
                down = rng.random() < 0.5 and (result - delta >= 0 or result < 0)
                wrong = result - delta if down else result + delta  # no "3+0=-2" giveaways
            result = wrong
        return f"{a}{op}{b}={result}"

    texts: list[str] = []
    seen: set[str] = set()
    for label in labels:
        for _attempt in range(1000):
            text = equation(bool(label))
            if text not in seen:
                break
        else:
            raise DlpipeError(f"seq_arith_check: could not draw {n} distinct equations; lower n")
        seen.add(text)
        texts.append(text)
    return texts, [int(v) for v in labels]


def split_labelled(
    texts: list[str], labels: list[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, tuple[list[str], list[int]]]:
    """A seeded split that keeps the class balance in every part (stratified)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed + 1)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(members)))
        n_val = int(round(val_fraction * len(members)))
        parts["test"].extend(members[:n_test])
        parts["val"].extend(members[n_test : n_test + n_val])
        parts["train"].extend(members[n_test + n_val :])
    if not parts["train"]:
        raise DlpipeError(f"no training examples left from {len(texts)} (fractions too large)")
    out = {}
    for split, idx in parts.items():
        idx = list(rng.permutation(np.asarray(idx, dtype=int))) if idx else []
        out[split] = ([texts[i] for i in idx], [int(y[i]) for i in idx])
    return out


def text_class_bundle(
    name: str,
    parts: dict[str, tuple[list[str], list[int]]],
    class_names: list[str],
    vocab: Vocabulary | None = None,
) -> TextClassBundle:
    """Tokenize labelled texts with ``vocab`` (default: the characters of the training
    split)."""
    vocab = vocab or char_vocabulary(parts["train"][0])
    length = max(len(vocab.encode(t)) for texts, _ in parts.values() for t in texts)
    return TextClassBundle(
        x={s: encode_texts(parts[s][0], vocab, length, end=False) for s in SPLITS},
        y={s: np.asarray(parts[s][1], dtype=np.int32) for s in SPLITS},
        task="classification",
        num_classes=len(class_names),
        class_names=list(class_names),
        name=name,
        vocab=vocab,
        texts={s: list(parts[s][0]) for s in SPLITS},
    )


def save_text_vocabulary(bundle: TextClassBundle, path: Path) -> Path:
    """Write ``{"source": vocabulary, "classes": names}`` as JSON."""
    assert bundle.vocab is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "special_tokens": {"pad": PAD_ID, "start": START_ID, "end": END_ID, "unk": UNK_ID},
        "source": bundle.vocab.to_dict(),
        "classes": list(bundle.class_names),
    }
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def arith_example_bundle(n: int = 80, seed: int = 0) -> TextClassBundle:
    """A tiny one-digit ``seq_arith_check`` bundle for conformance tests of text
    classifiers."""
    texts, labels = arith_check_examples(n, digits=1, seed=seed)
    return text_class_bundle("example_arith_check",
                             split_labelled(texts, labels, 0.1, 0.1, seed), ARITH_CLASSES)


def arith_check(ctx: Any, params: Any) -> None:
    """The ``seq_arith_check`` stage: right and wrong equations, character tokens."""
    seed = _seed(ctx, params)
    texts, labels = arith_check_examples(params.n, params.digits, params.operators,
                                         params.off_by, params.swap_fraction, seed)
    parts = split_labelled(texts, labels, params.val_fraction, params.test_fraction, seed)
    publish_text_classes(ctx, text_class_bundle("arith_check", parts, ARITH_CLASSES))


def publish_text_classes(ctx: Any, bundle: TextClassBundle) -> None:
    """Set ``ctx.data``, log the vocabulary and print a summary with examples."""
    ctx.data = bundle
    ctx.extras["data"] = bundle.describe()
    ctx.log_artifact(save_text_vocabulary(bundle, Path(ctx.run_dir) / "vocab" / "vocab.json"),
                     "vocab")
    assert bundle.vocab is not None
    sizes = "/".join(str(bundle.size(s)) for s in SPLITS)
    labels = np.asarray(bundle.y["train"])
    shown = ", ".join(
        f"{_short_text(t)!r}: {bundle.class_names[int(y)]}"
        for t, y in zip(bundle.texts["train"][:3], labels[:3], strict=False)
    )
    print(f"data: {bundle.name} {sizes} train/val/test, {bundle.vocab.level} tokens, vocab "
          f"{bundle.vocab.size}, length {bundle.sequence_length}; e.g. {shown}")


def _short_text(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
