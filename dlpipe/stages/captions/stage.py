"""The ``captions`` data stage (generators: :mod:`dlpipe.datasets.captions`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.data import SPLITS
from dlpipe.datasets.captions import (
    DIGIT_TEMPLATES,
    SHAPE_TEMPLATES,
    digits_bundle,
    save_caption_vocabulary,
    shapes_bundle,
)


def captions(ctx: Any, params: Any) -> None:
    """Caption the digits or shapes source, split, tokenize, set ``ctx.data`` and log
    the vocabulary as the ``vocab/vocab.json`` artifact."""
    seed = int(params.seed if params.seed is not None else ctx.seed)
    common = dict(
        val_fraction=params.val_fraction, test_fraction=params.test_fraction,
        stratify=params.stratify, normalize=params.normalize,
        value_range=tuple(params.value_range), tokenizer=params.tokenizer, seed=seed,
        caption_length=params.caption_length,
    )
    if params.source == "digits":
        templates = params.templates or list(DIGIT_TEMPLATES)
        bundle = digits_bundle(params.image_size, templates, params.limit, **common)
    else:
        templates = params.templates or list(SHAPE_TEMPLATES)
        n = params.n if params.limit is None else min(params.n, params.limit)
        bundle = shapes_bundle(
            n, params.size, params.label, templates, (1, params.max_objects),
            params.min_size, params.max_size, params.noise, params.background, **common,
        )
    ctx.data = bundle
    ctx.extras["data"] = bundle.describe()
    ctx.log_artifact(save_caption_vocabulary(bundle, Path(ctx.run_dir) / "vocab" / "vocab.json"),
                     "vocab")
    sizes = "/".join(str(bundle.size(s)) for s in SPLITS)
    shown = ", ".join(repr(t) for t in bundle.texts["train"][:3])
    assert bundle.vocab is not None
    print(f"data: {bundle.name} {sizes} train/val/test, images {bundle.input_shape}, "
          f"{bundle.num_classes} classes, {bundle.vocab.level} vocab {bundle.vocab.size}, "
          f"caption length {bundle.caption_length}; e.g. {shown}")
