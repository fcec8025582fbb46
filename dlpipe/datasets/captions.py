"""Image-caption pairs for the multimodal models (``clip``, ``captioner``).

One short caption for every image, written deterministically from a seed (no network,
no files):

* ``source: digits``: scikit-learn's 8x8 handwritten digits (optionally resized), each
  captioned from a template picked at random per image: ``"a handwritten seven"``,
  ``"the number 7"``, ``"a picture of a 7"``;
* ``source: shapes``: procedural coloured shapes from :mod:`dlpipe.datasets.shapes`,
  captioned by the scene itself: ``"a red circle"`` (``"a red circle and a blue
  square"`` for several objects, named left to right).

Every class (a digit; a shape, colour or coloured shape) has *fields*, the words a
template may use: ``{label}`` always, ``{digit}`` and ``{word}`` for digits, ``{color}``
and ``{shape}`` for shapes. Evaluation fills the same placeholders to write zero-shot
prompts (``"a photo of the number {digit}"``).

Captions become token ids here: word level by default (a caption is a handful of
words; a word vocabulary is natural) or character level, the vocabulary learned from
the training split (:func:`save_caption_vocabulary` writes it as JSON). The result is a
:class:`CaptionBundle`; see :meth:`CaptionBundle.examples` for what models train on.
The ``captions`` data stage is :mod:`dlpipe.stages.captions.stage`.

NumPy only at import; TensorFlow is imported inside :meth:`CaptionBundle.dataset` (and
by the image resize of the digits source).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data import SPLITS, DataBundle, resize_images, split_indices
from dlpipe.data import normalize as normalize_images
from dlpipe.datasets.vocab import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    Vocabulary,
    char_vocabulary,
    word_vocabulary,
)
from dlpipe.errors import DlpipeError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Caption templates of the digits source; one is drawn per image.
DIGIT_TEMPLATES = ("a handwritten {word}", "the number {digit}", "a picture of a {digit}")
#: The caption template of single-object shapes (several objects join with " and ").
SHAPE_TEMPLATES = ("a {color} {shape}",)


# --------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------


def caption_vocabulary(texts: Sequence[str], level: str = "word") -> Vocabulary:
    if level == "word":
        return word_vocabulary(texts)
    if level == "char":
        return char_vocabulary(texts)
    raise DlpipeError(f"captions: unknown tokenizer {level!r} (word or char)")


def encode_captions(texts: Sequence[str], vocab: Vocabulary, length: int) -> np.ndarray:
    """``(n, length)`` int32 ids: each caption's tokens, ``END``, then ``PAD``.

    Unknown tokens become ``UNK``; a caption longer than ``length - 1`` tokens is an
    error (the models' positional tables are that long).
    """
    out = np.full((len(texts), length), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = vocab.encode(text) + [END_ID]
        if len(ids) > length:
            raise DlpipeError(
                f"caption {text!r} has {len(ids) - 1} tokens; at most {length - 1} fit"
            )
        out[row, : len(ids)] = ids
    return out


# --------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------


@dataclass
class CaptionBundle(DataBundle):
    """Images, their captions (token ids) and class labels, split alike.

    ``x[split]``: float32 images ``(n, h, w, c)``; ``y[split]``: int32 class ids ``(n,)``
    (for zero-shot evaluation; the class's words are ``class_fields[label]``);
    ``captions[split]``: int32 ids ``(n, caption_length)``, each caption's tokens, then
    ``END``, then ``PAD``; ``texts[split]``: the caption strings.
    """

    captions: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    vocab: Vocabulary | None = None
    #: The words of each class, e.g. ``{"label": "7", "digit": "7", "word": "seven"}``.
    class_fields: list[dict[str, str]] = field(default_factory=list)
    #: The caption templates the data was written with (default zero-shot prompts).
    templates: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def caption_length(self) -> int:
        return int(self.captions["train"].shape[1])

    @property
    def vocab_size(self) -> int:
        assert self.vocab is not None
        return self.vocab.size

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "task": self.task,
            "caption_length": self.caption_length,
            "vocab_size": self.vocab_size,
            "tokenizer": self.vocab.level if self.vocab else None,
        }

    @staticmethod
    def decoder_inputs(ids: np.ndarray) -> np.ndarray:
        """Teacher forcing: the caption ids shifted right one step behind ``START``."""
        start = np.full((len(ids), 1), START_ID, dtype=np.int32)
        return np.concatenate([start, ids[:, :-1]], axis=1).astype(np.int32)

    def features(self, split: str) -> dict[str, np.ndarray]:
        """The model inputs of a split (see :meth:`dataset`), as NumPy arrays."""
        images = np.asarray(self.x[split], dtype=np.float32)
        captions = np.asarray(self.captions[split], dtype=np.int32)
        if len(captions) != len(images):
            raise DlpipeError(
                f"{self.name}: {len(images)} images but {len(captions)} captions in the "
                f"{split!r} split (oversampling is not supported for caption data)"
            )
        labels = self.y.get(split)
        labels = (np.full(len(images), -1, np.int32) if labels is None
                  else np.asarray(labels, dtype=np.int32))
        return {"images": images, "captions": captions,
                "decoder_inputs": self.decoder_inputs(captions), "labels": labels}

    def examples(self, split: str) -> Any:
        """``(inputs, caption_ids, token_weights)`` per example.

        ``inputs`` is a dict: ``images``; ``captions`` (the ids, for a text encoder);
        ``decoder_inputs`` (the ids shifted right behind ``START``, for teacher forcing);
        ``labels`` (class ids, -1 where unknown). The target is the caption ids and the
        weights are 1 on tokens and ``END``, 0 on padding. A dual encoder (``clip``)
        reads ``images``, ``captions`` and ``labels`` and ignores target and weights; a
        captioner reads ``images`` and ``decoder_inputs`` and learns the target.
        """
        inputs = self.features(split)
        target = inputs["captions"]
        return inputs, target, (target != PAD_ID).astype(np.float32)

    def augment_batch(self, batch: tuple[Any, ...]) -> tuple[Any, ...]:
        """Augmentation layers of augment stages apply to ``images``."""
        inputs, *rest = batch
        images = inputs["images"]
        for layer in self.augmenters:
            images = layer(images, training=True)
        return ({**inputs, "images": images}, *rest)


def prompt_texts(templates: Sequence[str], class_fields: Sequence[dict[str, str]]) -> list[list[str]]:
    """``templates`` filled with each class's words: ``[class][template]`` strings."""
    out = []
    for fields in class_fields:
        row = []
        for template in templates:
            try:
                row.append(template.format(**fields))
            except (KeyError, IndexError, ValueError) as exc:
                raise DlpipeError(
                    f"prompt {template!r}: unknown or bad placeholder ({exc}); this data "
                    f"offers {', '.join('{' + k + '}' for k in fields)}"
                ) from exc
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------


def digit_fields() -> list[dict[str, str]]:
    return [{"label": str(d), "digit": str(d), "word": DIGIT_WORDS[d]} for d in range(10)]


def digit_captions(
    labels: np.ndarray, templates: Sequence[str] = DIGIT_TEMPLATES, seed: int = 0
) -> list[str]:
    """One caption per digit label, its template drawn from a ``(seed, 1)`` stream."""
    fields = digit_fields()
    rng = np.random.default_rng([seed, 1])
    picks = rng.integers(0, len(templates), len(labels))
    table = prompt_texts(templates, fields)
    return [table[int(y)][int(t)] for y, t in zip(labels, picks, strict=True)]


def shape_classes(label: str) -> tuple[list[str], list[dict[str, str]]]:
    """Class names and fields of the shapes source for ``label`` (shape, color or
    shape_color)."""
    from dlpipe.datasets.shapes import COLORS, SHAPES

    if label == "shape":
        fields = [{"label": s, "shape": s} for s in SHAPES]
    elif label == "color":
        fields = [{"label": c, "color": c} for c in COLORS]
    elif label == "shape_color":
        fields = [{"label": f"{c} {s}", "shape": s, "color": c} for s in SHAPES for c in COLORS]
    else:
        raise DlpipeError(f"captions: unknown shapes label {label!r}")
    return [f["label"] for f in fields], fields


def shape_captions(scenes: Sequence[Any], templates: Sequence[str] = SHAPE_TEMPLATES,
                   seed: int = 0) -> list[str]:
    """A caption per scene: each object's template (drawn per object from a ``(seed, 2)``
    stream) filled with its colour and shape, objects joined by ``" and "`` from left to
    right (by box centre), so the caption is a function of the image."""
    from dlpipe.datasets.shapes import COLORS, SHAPES

    colors = list(COLORS)
    rng = np.random.default_rng([seed, 2])
    out = []
    for scene in scenes:
        parts = []
        objects = sorted(zip(scene.boxes, scene.shapes, scene.colors, strict=True),
                         key=lambda o: (o[0][0] + o[0][2], o[0][1] + o[0][3]))
        for _, s, c in objects:
            template = templates[int(rng.integers(len(templates)))]
            parts.append(template.format(shape=SHAPES[s], color=colors[c],
                                         label=f"{colors[c]} {SHAPES[s]}"))
        out.append(" and ".join(parts))
    return out


# --------------------------------------------------------------------------------------
# Building the bundle
# --------------------------------------------------------------------------------------


def make_bundle(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    captions: list[str],
    class_names: list[str],
    class_fields: list[dict[str, str]],
    templates: Sequence[str],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    stratify: bool = True,
    normalize: str = "minmax",
    value_range: tuple[float, float] = (0.0, 1.0),
    tokenizer: str = "word",
    source: str = "",
    caption_length: int | None = None,
) -> CaptionBundle:
    """Split (stratified by label), normalize images with training statistics, learn the
    vocabulary from the training captions and tokenize every split.

    ``caption_length`` (token positions, ``END`` included; default: the longest caption's)
    leaves room for longer zero-shot prompts."""
    parts = split_indices(len(images), labels, val_fraction, test_fraction, seed, stratify,
                          source=name)
    xs = {s: images[idx] for s, idx in parts.items()}
    xs, value = normalize_images(xs, normalize, tuple(value_range), image=True)  # type: ignore[arg-type]
    texts = {s: [captions[i] for i in idx] for s, idx in parts.items()}
    vocab = caption_vocabulary(texts["train"], tokenizer)
    longest = 1 + max(len(vocab.encode(t)) for t in captions)
    if caption_length is not None and caption_length < longest:
        raise DlpipeError(f"captions: caption_length {caption_length} is too short; the longest "
                          f"caption needs {longest} positions (END included)")
    length = caption_length or longest
    return CaptionBundle(
        x=xs,
        y={s: np.asarray(labels[idx], dtype=np.int32) for s, idx in parts.items()},
        task="image_text",
        num_classes=len(class_names),
        class_names=list(class_names),
        value_range=value,
        name=name,
        captions={s: encode_captions(texts[s], vocab, length) for s in SPLITS},
        texts=texts,
        vocab=vocab,
        class_fields=[dict(f) for f in class_fields],
        templates=list(templates),
        source=source,
    )


def digits_bundle(
    image_size: tuple[int, int] | None = None,
    templates: Sequence[str] = DIGIT_TEMPLATES,
    limit: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> CaptionBundle:
    """Captioned scikit-learn digits (1,797 images, values scaled by ``normalize``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., np.newaxis]
    y = digits.target.astype(np.int32)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if image_size is not None:
        x = resize_images(x, tuple(image_size))  # type: ignore[arg-type]
    captions = digit_captions(y, templates, seed)
    return make_bundle("captions_digits", x, y, captions, [str(d) for d in range(10)],
                       digit_fields(), templates, seed=seed, source="digits", **kwargs)


def shapes_bundle(
    n: int = 2000,
    size: int = 32,
    label: str = "shape_color",
    templates: Sequence[str] = SHAPE_TEMPLATES,
    objects: tuple[int, int] = (1, 1),
    min_size: float = 0.3,
    max_size: float = 0.6,
    noise: float = 0.02,
    background: str = "dark",
    seed: int = 0,
    **kwargs: Any,
) -> CaptionBundle:
    """Captioned procedural shapes; the label is the first object's class."""
    from dlpipe.datasets.shapes import COLORS, generate_scenes

    out = generate_scenes(n, size=size, objects=objects, min_frac=min_size, max_frac=max_size,
                          noise=noise, background=background, seed=seed)
    first_shape = np.asarray([s.shapes[0] for s in out.scenes], dtype=np.int32)
    first_color = np.asarray([s.colors[0] for s in out.scenes], dtype=np.int32)
    labels = {"shape": first_shape, "color": first_color,
              "shape_color": first_shape * len(COLORS) + first_color}[label]
    names, fields = shape_classes(label)
    captions = shape_captions(out.scenes, templates, seed)
    return make_bundle("captions_shapes", out.images, labels, captions, names, fields,
                       templates, seed=seed, source="shapes", **kwargs)


def example_bundle(n: int = 48, seed: int = 0) -> CaptionBundle:
    """A tiny captioned-shapes bundle (12x12 images) for conformance tests."""
    return shapes_bundle(n, size=12, seed=seed, val_fraction=0.25, test_fraction=0.25)


def save_caption_vocabulary(bundle: CaptionBundle, path: Path) -> Path:
    """Write the vocabulary, the classes with their words and the templates as JSON."""
    assert bundle.vocab is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "special_tokens": {"pad": PAD_ID, "start": START_ID, "end": END_ID, "unk": UNK_ID},
        "captions": bundle.vocab.to_dict(),
        "caption_length": bundle.caption_length,
        "classes": list(bundle.class_names),
        "class_fields": bundle.class_fields,
        "templates": bundle.templates,
    }
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
