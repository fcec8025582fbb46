"""The ``classifier_report`` evaluate stage: how good a classifier is, and where it fails.

Metrics (logged once, ``step=None``), for the evaluated split (``test`` by default):

* ``test_loss`` and whatever else ``model.evaluate`` reports, and ``test_accuracy``;
* ``test_precision_<k>`` and ``test_recall_<k>`` for every class index ``k``, and their
  macro averages ``test_precision_macro``, ``test_recall_macro``, ``test_f1_macro``;
* for two classes, ``test_roc_auc`` and ``test_average_precision`` (class 1 positive).

Plots (under ``plots/``): ``learning_curves.png`` (after training),
``confusion_matrix.png``, ``misclassified.png`` (the wrong predictions made with the
highest confidence: the image, or for tables the predicted probabilities, titled with
the true and predicted labels), for two classes ``roc_curve.png`` and ``pr_curve.png``,
and the architecture's own plots.

The model may output softmax probabilities (every built-in classifier does), logits
(they are put through a softmax), or one sigmoid probability for binary tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe.plotting import confusion_matrix_figure, learning_curves_figure, plt
from dlpipe.stages.reports.common import (
    compiled_metrics,
    evaluation_inputs,
    split_predictions,
)


def class_probabilities(outputs: Any) -> np.ndarray:
    """``(n, classes)`` probabilities from a model's raw predictions.

    A list of outputs (a model with auxiliary heads) uses the first. One column is a
    sigmoid probability of class 1; rows that are not distributions are logits.
    """
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    p = np.asarray(outputs, dtype="float64")
    p = p.reshape(len(p), -1)
    if p.shape[1] == 1:
        p1 = p[:, 0]
        if p1.min(initial=0.0) < 0.0 or p1.max(initial=0.0) > 1.0:
            p1 = 1.0 / (1.0 + np.exp(-p1))
        return np.stack([1.0 - p1, p1], axis=1)
    distributions = p.min(initial=0.0) >= 0.0 and np.allclose(p.sum(axis=1), 1.0, atol=1e-3)
    if not distributions:
        e = np.exp(p - p.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    return p


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, split: str, per_class: bool = True
) -> dict[str, float]:
    """Accuracy, cross-entropy, per-class and macro precision/recall, binary AUCs."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    metrics = {
        f"{split}_accuracy": float(np.mean(predicted == y)),
        f"{split}_crossentropy": float(
            -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)))
        ),
    }
    labels = list(range(n_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, labels=labels, zero_division=0
    )
    if per_class:
        for k in labels:
            metrics[f"{split}_precision_{k}"] = float(precision[k])
            metrics[f"{split}_recall_{k}"] = float(recall[k])
    metrics[f"{split}_precision_macro"] = float(np.mean(precision))
    metrics[f"{split}_recall_macro"] = float(np.mean(recall))
    metrics[f"{split}_f1_macro"] = float(np.mean(f1))
    if n_classes == 2 and len(np.unique(y)) == 2:
        metrics[f"{split}_roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
        metrics[f"{split}_average_precision"] = float(average_precision_score(y, probs[:, 1]))
    return metrics


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _label(names: Sequence[str], k: int) -> str:
    return names[k] if k < len(names) else str(k)


def _show_image(ax: Any, image: np.ndarray, value_range: tuple[float, float]) -> None:
    low, high = value_range
    image = (np.clip(image, low, high) - low) / max(high - low, 1e-12)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])


def _show_probabilities(ax: Any, p: np.ndarray, true: int, pred: int) -> None:
    colours = ["tab:gray"] * len(p)
    colours[pred] = "tab:red"
    colours[true] = "tab:green"
    ax.bar(range(len(p)), p, color=colours)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(p)))
    ax.tick_params(labelsize=6)


def misclassified_figure(
    x: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    count: int = 16,
    value_range: tuple[float, float] = (0.0, 1.0),
    texts: Sequence[str] | None = None,
) -> Any:
    """A grid of the ``count`` wrong predictions made with the highest confidence.

    Image inputs are shown as images; other inputs as bars of the predicted
    probabilities (green: the true class, red: the prediction), titled with the
    example's text when the data has ``texts`` (token-id bundles).
    """
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y)
    confidence = probs[wrong, predicted[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")][:count]
    if len(chosen) == 0:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, f"no misclassified examples ({len(y)} evaluated)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    cols = min(len(chosen), 8)
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    image = x.ndim == 4 and x.shape[-1] in (1, 3, 4)
    for ax, i in zip(axes.flat, chosen, strict=False):
        true, pred = int(y[i]), int(predicted[i])
        if image:
            _show_image(ax, x[i], value_range)
        else:
            _show_probabilities(ax, probs[i], true, pred)
        text = f"{texts[i]}\n" if texts is not None else ""
        ax.set_title(
            f"{text}true {_label(class_names, true)}\npred {_label(class_names, pred)} "
            f"({probs[i, pred]:.2f})",
            fontsize=7,
        )
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_axis_off()
    fig.suptitle(f"most confident mistakes ({len(wrong)} of {len(y)} wrong)", fontsize=9)
    fig.tight_layout()
    return fig


def roc_figure(y: np.ndarray, score: np.ndarray, positive: str) -> Any:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, score):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curve (positive: {positive})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def pr_figure(y: np.ndarray, score: np.ndarray, positive: str) -> Any:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, score)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.step(recall, precision, where="post", label=f"AP {average_precision_score(y, score):.3f}")
    ax.axhline(float(np.mean(y)), ls="--", color="gray", lw=1, label="chance")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall curve (positive: {positive})")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def classifier_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, stage = evaluation_inputs(ctx, split, "classifier_report", targets="labels")

    metrics = compiled_metrics(model, data, split, params.batch_size)
    labels, outputs = split_predictions(model, data, split, params.batch_size)
    y = labels.reshape(-1).astype(int)
    probs = class_probabilities(outputs)
    metrics.update(classification_metrics(y, probs, split, params.per_class))
    ctx.log_metrics(metrics)

    names = list(data.class_names) or [str(k) for k in range(probs.shape[1])]
    print(f"classifier_report ({split}, {len(y)} examples):")
    for key in (f"{split}_loss", f"{split}_accuracy", f"{split}_precision_macro",
                f"{split}_recall_macro", f"{split}_f1_macro", f"{split}_roc_auc"):
        if key in metrics:
            print(f"  {key:<24} {metrics[key]:.4f}")

    if not params.plots:
        return
    if ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    predicted = probs.argmax(axis=1)
    ctx.log_figure(confusion_matrix_figure(y, predicted, names), "confusion_matrix.png")
    if params.worst > 0:
        low, high = getattr(data, "value_range", (0.0, 1.0))
        texts = getattr(data, "texts", {}).get(split)
        # Every example in memory; the first max_report_examples of streamed data.
        x = np.asarray(data.x[split])
        fig = misclassified_figure(
            x, y[: len(x)], probs[: len(x)], names, params.worst, (float(low), float(high)),
            texts=texts,
        )
        ctx.log_figure(fig, "misclassified.png")
    if probs.shape[1] == 2 and len(np.unique(y)) == 2:
        positive = _label(names, 1)
        ctx.log_figure(roc_figure(y, probs[:, 1], positive), "roc_curve.png")
        ctx.log_figure(pr_figure(y, probs[:, 1], positive), "pr_curve.png")
    entry = ctx.model_entry()
    plotter = entry.plotter() if entry else None
    if plotter is not None:
        for filename, figure in plotter(ctx, model, data):
            ctx.log_figure(figure, filename)
