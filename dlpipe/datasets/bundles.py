"""Bundles of token ids: :class:`SeqBundle` (source/target pairs, for
sequence-to-sequence models) and :class:`TextClassBundle` (labelled texts, for text
classifiers), built from texts with the vocabularies of :mod:`dlpipe.datasets.vocab`.

NumPy only; TensorFlow is imported when a bundle's ``dataset`` is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import SPLITS, DataBundle
from dlpipe.datasets.vocab import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    Vocabulary,
    char_vocabulary,
    encode_texts,
    make_vocabulary,
)

#: ``(sources, targets)``: two lists of strings of the same length.
Pairs = tuple[list[str], list[str]]


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
