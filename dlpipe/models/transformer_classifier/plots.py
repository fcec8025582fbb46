"""The ``transformer_classifier`` figure: the ``[cls]`` token's attention over the
tokens of a few test texts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe.data import DataBundle


def cls_attention_figure(
    texts: list[str],
    tokens: list[list[str]],
    maps: list[np.ndarray],
    titles: list[str],
) -> Any:
    """One row of panels per example: the ``[cls]`` query's attention over the tokens
    (mean of the heads), one panel per block."""
    from matplotlib.figure import Figure

    rows, blocks = len(texts), len(maps)
    width = max(len(t) for t in tokens) + 1
    fig = Figure(figsize=(min(2.2 + 0.35 * width * blocks, 16), 0.9 * rows + 0.8))
    axes = fig.subplots(rows, blocks, squeeze=False)
    for i in range(rows):
        labels = ["[cls]", *tokens[i]]
        for b in range(blocks):
            weights = maps[b][i].mean(axis=0)[0, : len(labels)]  # the [cls] query row
            ax = axes[i, b]
            ax.imshow(weights[None, :], cmap="viridis", vmin=0.0, aspect="auto")
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"block {b}", fontsize=8)
            if b == 0:
                ax.set_ylabel(titles[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("[cls] attention over the tokens (mean of heads)", fontsize=9)
    fig.tight_layout()
    return fig


def plots(context: Any, model: Any, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``cls_attention.png`` for four right and four wrong
    test predictions (fewer when there are not so many)."""
    vocab = getattr(data, "source_vocab", None)
    if vocab is None or not hasattr(model, "attention_maps") or data.size("test") == 0:
        return
    x = np.asarray(data.x["test"], dtype=np.int32)
    y = np.asarray(data.y["test"]).reshape(-1)
    probs = np.asarray(model.predict(x, batch_size=256, verbose=0))
    predicted = probs.argmax(axis=1)
    right = np.flatnonzero(predicted == y)[:4]
    wrong = np.flatnonzero(predicted != y)[:4]
    chosen = np.concatenate([right, wrong]).astype(int)
    if not len(chosen):
        return
    maps = model.attention_maps(x[chosen])
    names = list(data.class_names) or [str(k) for k in range(probs.shape[1])]
    texts = [vocab.decode(x[i]) for i in chosen]
    tokens = [vocab.token_strings(x[i]) for i in chosen]
    titles = [f"{t!r}\ntrue {names[y[i]]}, pred {names[predicted[i]]} "
              f"({probs[i, predicted[i]]:.2f})" for t, i in zip(texts, chosen, strict=True)]
    yield "cls_attention.png", cls_attention_figure(texts, tokens, maps, titles)
