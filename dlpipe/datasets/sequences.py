"""Procedural text tasks, generated deterministically from a seed (no network, no files).

Four sequence-to-sequence tasks give ``(sources, targets)`` pairs:

* ``addition``: ``"535+61"`` -> ``"596"``;
* ``dates``: a date in one of several human formats (``"23 November 2026"``,
  ``"nov 23, 2026"``, ``"2026/11/23"``, ...) -> its ISO form ``"2026-11-23"``;
* ``reverse``: ``"hello"`` -> ``"olleh"`` (or an unchanged copy);
* ``sort``: ``"31412"`` -> ``"11234"``.

One classification task gives labelled texts: ``arith_check``, is ``"35+61=96"`` right
(class ``correct``) or ``"35+61=97"`` wrong. :func:`example_bundle` and
:func:`arith_example_bundle` are the small bundles the sequence architectures'
conformance tests train on. NumPy only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import numpy as np

from dlpipe.data import SPLITS
from dlpipe.datacheck import check_split
from dlpipe.datasets.bundles import (
    Pairs,
    SeqBundle,
    TextClassBundle,
    text_class_bundle,
    tokenize,
)
from dlpipe.errors import DlpipeError

# --------------------------------------------------------------------------------------
# Sequence pairs
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


def arith_example_bundle(n: int = 80, seed: int = 0) -> TextClassBundle:
    """A tiny one-digit ``seq_arith_check`` bundle for conformance tests of text
    classifiers."""
    texts, labels = arith_check_examples(n, digits=1, seed=seed)
    return text_class_bundle("example_arith_check",
                             split_labelled(texts, labels, 0.1, 0.1, seed), ARITH_CLASSES)
