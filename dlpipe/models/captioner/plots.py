"""The ``captioner`` figure: generated and true captions under a few test images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dlpipe.datasets.captions import CaptionBundle


def caption_grid(images: np.ndarray, generated: Sequence[str], truth: Sequence[str],
                 value_range: Sequence[float] = (0.0, 1.0), cols: int = 4) -> Any:
    """Images with the generated caption (green when it equals the true one, red
    otherwise) and the true caption under each."""
    from matplotlib.figure import Figure

    from dlpipe.models.grids import show, to_display

    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(2.6 * cols, 2.7 * rows))
    pictures = to_display(images, value_range)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        if i >= n:
            ax.set_axis_off()
            continue
        show(ax, pictures[i])
        ok = generated[i] == truth[i]
        ax.set_title(f"{generated[i] or '(empty)'}\ntrue: {truth[i]}", fontsize=7,
                     color="green" if ok else "red")
    fig.tight_layout()
    return fig


def plots(context: Any, model: Any, data: CaptionBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``captions.png``, greedy captions of 8 test images."""
    split = "test" if data.size("test") else "train"
    images = np.asarray(data.x[split][:8], dtype=np.float32)
    ids = model.caption(images)
    assert data.vocab is not None  # a caption bundle always has its vocabulary
    generated = [data.vocab.decode(row) for row in ids]
    yield "captions.png", caption_grid(images, generated, data.texts[split][:8], data.value_range)

