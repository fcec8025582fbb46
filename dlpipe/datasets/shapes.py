"""Procedural shapes: circles, squares and triangles in colours, drawn from a seed.

No download and no TensorFlow: :func:`generate_scenes` paints each image with NumPy
from its own ``(seed, index)`` random stream, so the same seed always gives the same
images, masks, boxes and captions, on any machine. A scene's mask has 0 for the
background and ``1 + shape index`` elsewhere; :meth:`Scenes.boxes` gives padded
``(n, max_objects, 5)`` rows ``[class, x_min, y_min, x_max, y_max]`` (coordinates in
``[0, 1]``; padding rows have class ``-1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}


@dataclass
class Scene:
    """The objects painted into one image."""

    shapes: list[int] = field(default_factory=list)  # index into SHAPES
    colors: list[int] = field(default_factory=list)  # index into COLORS
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # pixels

    def caption(self) -> str:
        """``"a red circle"``, or ``"a red circle and a blue square"`` for several."""
        names = list(COLORS)
        parts = [f"a {names[c]} {SHAPES[s]}" for s, c in zip(self.shapes, self.colors, strict=True)]
        return " and ".join(parts)


@dataclass
class Scenes:
    """What :func:`generate_scenes` returns; arrays are indexed by example."""

    images: np.ndarray  # (n, size, size, 3) float32 in [0, 1]
    masks: np.ndarray  # (n, size, size) int32: 0 background, 1 + shape index
    scenes: list[Scene]

    def boxes(self, max_objects: int) -> np.ndarray:
        """``(n, max_objects, 5)`` float32 rows ``[class, x0, y0, x1, y1]``, coords in [0, 1]."""
        size = self.images.shape[1]
        out = np.full((len(self.scenes), max_objects, 5), -1.0, dtype=np.float32)
        out[..., 1:] = 0.0
        for i, scene in enumerate(self.scenes):
            for j, (shape, box) in enumerate(zip(scene.shapes, scene.boxes, strict=True)):
                out[i, j, 0] = shape
                out[i, j, 1:] = np.asarray(box, dtype=np.float32) / size
        return out


def _paint(
    rng: np.random.Generator, size: int, shape: int, min_frac: float, max_frac: float
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A boolean mask of one shape at a random place and size, and its pixel box."""
    side = rng.uniform(min_frac, max_frac) * size
    x0 = rng.uniform(0, size - side)
    y0 = rng.uniform(0, size - side)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if SHAPES[shape] == "circle":
        cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    elif SHAPES[shape] == "square":
        mask = (xx >= x0) & (xx <= x0 + side) & (yy >= y0) & (yy <= y0 + side)
    else:  # upward triangle: apex at the top centre, base along the bottom
        apex_x, base_y = x0 + side / 2, y0 + side
        rel = (yy - y0) / side  # 0 at the apex, 1 at the base
        half = rel * side / 2
        mask = (yy >= y0) & (yy <= base_y) & (np.abs(xx - apex_x) <= half)
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:  # a sliver too thin to hit a pixel centre
        mask[int(min(y0, size - 1)), int(min(x0, size - 1))] = True
        rows, cols = np.nonzero(mask)
    box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return mask, box


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(smaller, 1e-9)


def generate_scenes(
    n: int,
    *,
    size: int = 32,
    objects: tuple[int, int] = (1, 1),
    min_frac: float = 0.3,
    max_frac: float = 0.6,
    noise: float = 0.0,
    background: str = "dark",
    max_overlap: float = 0.1,
    seed: int = 0,
    shapes: np.ndarray | None = None,
) -> Scenes:
    """Paint ``n`` images of ``objects[0]..objects[1]`` shapes each.

    ``shapes`` optionally fixes the first object's shape per image (for balanced
    classes). Objects are kept apart (at most ``max_overlap`` of the smaller box
    covered) so every box stays visible. ``background``: ``dark`` (near black),
    ``light`` or ``random`` grey level per image; ``noise`` adds Gaussian pixel noise.
    """
    images = np.zeros((n, size, size, 3), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.int32)
    colors = np.asarray(list(COLORS.values()), dtype=np.float32)
    scenes: list[Scene] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        level = {"dark": 0.05, "light": 0.9}.get(background)
        grey = rng.uniform(0.0, 0.5) if level is None else level
        image = np.full((size, size, 3), grey, dtype=np.float32)
        scene = Scene()
        count = int(rng.integers(objects[0], objects[1] + 1))
        for j in range(count):
            shape = int(shapes[i]) if (j == 0 and shapes is not None) else int(rng.integers(len(SHAPES)))
            color = int(rng.integers(len(COLORS)))
            for _attempt in range(20):
                mask, box = _paint(rng, size, shape, min_frac, max_frac)
                if all(_overlap(box, other) <= max_overlap for other in scene.boxes):
                    break
            else:
                continue  # no room left for this object
            image[mask] = colors[color]
            masks[i][mask] = shape + 1
            scene.shapes.append(shape)
            scene.colors.append(color)
            scene.boxes.append(box)
        if noise > 0:
            image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
        images[i] = np.clip(image, 0.0, 1.0)
        scenes.append(scene)
    return Scenes(images=images, masks=masks, scenes=scenes)
