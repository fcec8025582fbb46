"""Generic plots shared by stages (model-specific plots live with their model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_SKIP = {"learning_rate", "epoch_time_s"}


def learning_curves_figure(history: Mapping[str, Sequence[float]]) -> Any:
    """One panel per metric, training and validation curves together."""
    names = [k for k in history if not k.startswith("val_") and k not in _SKIP]
    names = names or [k for k in history if k not in _SKIP]
    cols = min(len(names), 3) or 1
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], marker="o", ms=3, label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker="o", ms=3, label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(y_true: Any, y_pred: Any, class_names: Sequence[str]) -> Any:
    n = max(len(class_names), int(np.max(y_true)) + 1, int(np.max(y_pred)) + 1)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    labels = list(class_names) or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 1 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(n), labels[:n], rotation=45)
    ax.set_yticks(range(n), labels[:n])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})")
    fig.tight_layout()
    return fig
