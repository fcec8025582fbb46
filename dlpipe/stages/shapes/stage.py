"""The ``shapes``, ``shapes_segmentation`` and ``shapes_detection`` data stages.

The images come from :func:`dlpipe.datasets.shapes.generate_scenes`:

- ``shapes``: one shape per image, labelled by shape, colour, or both (classification);
- ``shapes_segmentation``: several shapes per image on a noisy background, with a
  per-pixel class mask (0 is background, ``1 + shape index`` otherwise);
- ``shapes_detection``: several shapes per image with their boxes, padded rows of class
  ``-1`` (see :meth:`dlpipe.datasets.shapes.Scenes.boxes`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe.datasets.shapes import COLORS, SHAPES, Scenes, generate_scenes
from dlpipe.stages.data.finish import finish


def _balanced(n: int, k: int, seed: int) -> np.ndarray:
    labels = np.arange(n) % k
    return np.random.default_rng(seed).permutation(labels)


def shapes(ctx: Any, params: Any) -> None:
    """One shape per image; the label is its shape, its colour, or both."""
    seed = params.seed if params.seed is not None else ctx.seed
    first = _balanced(params.n, len(SHAPES), seed)
    out = generate_scenes(
        params.n,
        size=params.size,
        objects=(1, 1),
        min_frac=params.min_size,
        max_frac=params.max_size,
        noise=params.noise,
        background=params.background,
        seed=seed,
        shapes=first,
    )
    shape_ids = np.asarray([s.shapes[0] for s in out.scenes], dtype=np.int32)
    color_ids = np.asarray([s.colors[0] for s in out.scenes], dtype=np.int32)
    if params.label == "shape":
        y, names = shape_ids, list(SHAPES)
    elif params.label == "color":
        y, names = color_ids, list(COLORS)
    else:
        y = shape_ids * len(COLORS) + color_ids
        names = [f"{c} {s}" for s in SHAPES for c in COLORS]
    finish(ctx, params, "shapes", out.images, y, "classification", names, resize=False)


def _scenes(ctx: Any, params: Any) -> Scenes:
    """Several shapes per image on random grey backgrounds, as the scene stages use."""
    return generate_scenes(
        params.n,
        size=params.size,
        objects=(params.min_objects, params.max_objects),
        min_frac=params.min_size,
        max_frac=params.max_size,
        noise=params.noise,
        background="random",
        seed=params.seed if params.seed is not None else ctx.seed,
    )


def shapes_segmentation(ctx: Any, params: Any) -> None:
    """Several shapes on a noisy background, with per-pixel class masks."""
    out = _scenes(ctx, params)
    names = ["background", *SHAPES]
    bundle = finish(ctx, params, "shapes_segmentation", out.images, out.masks, "segmentation",
                     names, resize=False)
    bundle.num_classes = len(names)


def shapes_detection(ctx: Any, params: Any) -> None:
    """Several shapes per image with class boxes (padded rows of class -1)."""
    out = _scenes(ctx, params)
    bundle = finish(ctx, params, "shapes_detection", out.images, out.boxes(params.max_objects),
                     "detection", list(SHAPES), resize=False)
    bundle.num_classes = len(SHAPES)
