"""The ``vit`` figure: where the [cls] token of the last block looks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe.data import DataBundle
from dlpipe.models.vit.model import ViTBlock, cls_attention


def attention_figure(images: np.ndarray, maps: np.ndarray, titles: list[str],
                     value_range: tuple[float, float]) -> Any:
    """The images with their titles on top, the same images under their attention
    ``maps`` ``(n, rows, cols)`` below."""
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(1.6 * n, 3.6))
    axes = fig.subplots(2, n, squeeze=False)
    low, high = value_range
    for i in range(n):
        image = (np.clip(images[i], low, high) - low) / max(high - low, 1e-12)
        shown = image[..., 0] if image.shape[-1] == 1 else image[..., :3]
        axes[0, i].imshow(shown, cmap="gray" if image.shape[-1] == 1 else None)
        axes[0, i].set_title(titles[i], fontsize=7)
        axes[1, i].imshow(shown, cmap="gray" if image.shape[-1] == 1 else None)
        axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6, interpolation="nearest",
                          extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("[cls] attention", fontsize=7)
    fig.suptitle("last block: where the [cls] token looks (mean of heads)", fontsize=9)
    fig.tight_layout()
    return fig


def plots(context: Any, model: Any, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``cls_attention.png`` for eight test images."""
    if data.size("test") == 0 or not any(isinstance(la, ViTBlock) for la in model.layers):
        return
    images = np.asarray(data.x["test"][:8])
    targets = data.y["test"]
    assert targets is not None  # a classifier's data is labelled
    labels = np.asarray(targets[:8]).reshape(-1)
    probs = np.asarray(model.predict(images, verbose=0))
    names = list(data.class_names) or [str(k) for k in range(probs.shape[1])]
    titles = [f"true {names[int(t)]}\npred {names[int(p)]}"
              for t, p in zip(labels, probs.argmax(axis=1), strict=True)]
    maps = cls_attention(model, images)
    low, high = getattr(data, "value_range", (0.0, 1.0))
    yield "cls_attention.png", attention_figure(images, maps, titles, (float(low), float(high)))
