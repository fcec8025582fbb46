"""The ``clip`` figure: cosine similarities of a few held-out images and captions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dlpipe.models.clip.model import CLIP, embed

if TYPE_CHECKING:
    from dlpipe.datasets.captions import CaptionBundle


def pick_examples(labels: np.ndarray | None, n: int) -> np.ndarray:
    """Up to ``n`` indices, one per class first (in class order), then the rest."""
    if labels is None or len(labels) == 0:
        return np.arange(min(n, 0 if labels is None else len(labels)))
    labels = np.asarray(labels)
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    rest = [i for i in range(len(labels)) if i not in set(firsts)]
    return np.asarray((firsts + rest)[:n], dtype=int)


def similarity_figure(similarity: np.ndarray, images: np.ndarray, captions: Sequence[str],
                      value_range: Sequence[float] = (0.0, 1.0), title: str = "") -> Any:
    """Heat-map of cosine similarities ``(images, captions)`` with the images drawn as
    row labels and the caption texts as column labels (the diagonal are true pairs)."""
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from dlpipe.models.grids import to_display

    n_rows, n_cols = similarity.shape
    fig = Figure(figsize=(min(2.0 + 0.55 * n_cols, 14.0), min(2.5 + 0.5 * n_rows, 14.0)))
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(similarity, cmap="viridis", vmin=-1.0, vmax=1.0, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if similarity[i, j] < 0.5 else "black")
    ax.set_xticks(range(n_cols), list(captions), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_rows), [""] * n_rows)
    pictures = to_display(images, value_range)
    zoom = 18.0 / max(pictures.shape[1], 1)
    for i, picture in enumerate(pictures):
        art = picture[..., 0] if picture.shape[-1] == 1 else picture
        box = OffsetImage(art, zoom=zoom, cmap="gray" if picture.shape[-1] == 1 else None)
        ax.add_artist(AnnotationBbox(box, (-0.5, i), xybox=(-14, 0), xycoords="data",
                                     boxcoords="offset points", frameon=False,
                                     annotation_clip=False))
    ax.set_xlabel("caption")
    ax.set_ylabel("image", labelpad=28)
    fig.colorbar(shown, ax=ax, fraction=0.04, label="cosine similarity")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def similarity_plot(model: CLIP, data: CaptionBundle, split: str = "test", n: int = 10) -> Any:
    """The similarity figure of ``n`` held-out pairs (one per class first)."""
    if data.size(split) == 0:
        split = "train"
    index = pick_examples(data.y.get(split), n)
    images = np.asarray(data.x[split][index], dtype=np.float32)
    image_emb = embed(model.encode_images, images)
    text_emb = embed(model.encode_texts, np.asarray(data.captions[split][index]))
    texts = [data.texts[split][i] for i in index]
    return similarity_figure(image_emb @ text_emb.T, images, texts, data.value_range,
                             f"image-caption cosine similarity ({split})")


def plots(context: Any, model: Any, data: CaptionBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``similarity_matrix.png`` of a few held-out pairs."""
    yield "similarity_matrix.png", similarity_plot(model, data)
