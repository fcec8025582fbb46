"""The sequence data stages (``seq_addition``, ``seq_dates``, ``seq_reverse``,
``seq_sort``, ``seq_arith_check``) and the ``tokenizer`` stage.

Each data stage generates its texts with :mod:`dlpipe.datasets.sequences`, splits them
with the seed, tokenizes them (:mod:`dlpipe.datasets.bundles`), sets ``ctx.data`` and
logs the vocabularies as the ``vocab/vocab.json`` artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import SPLITS
from dlpipe.datasets.bundles import (
    Pairs,
    SeqBundle,
    TextClassBundle,
    save_text_vocabulary,
    save_vocabularies,
    text_class_bundle,
    tokenize,
)
from dlpipe.datasets.sequences import (
    ARITH_CLASSES,
    add_filler_words,
    addition_pairs,
    arith_check_examples,
    date_pairs,
    reverse_pairs,
    sort_pairs,
    split_labelled,
    split_pairs,
)
from dlpipe.datasets.vocab import make_vocabulary
from dlpipe.errors import DlpipeError


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
