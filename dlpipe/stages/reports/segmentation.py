"""The ``segmentation_report`` evaluate stage, and the segmentation metrics it logs.

Metrics (NumPy only, usable on their own) compare integer masks ``y_true`` with
predicted masks ``y_pred`` of the same shape. Everything comes from one pixel
confusion matrix accumulated over the *whole split* (not averaged per image), as
in PASCAL VOC and ``keras.metrics.MeanIoU``. For class ``k`` with ``TP``, ``FP`` and
``FN`` pixel counts:

* IoU (Jaccard) ``= TP / (TP + FP + FN)``;
* Dice (F1)     ``= 2 TP / (2 TP + FP + FN)``.

**Convention for absent classes:** a class that occurs neither in the truth nor in the
prediction (``TP + FP + FN = 0``) has no defined score: it is ``nan`` per class and
left out of the means (mean IoU, mean Dice). A class that is only predicted (a false
alarm) or only true (missed entirely) scores 0 and counts. So a perfect prediction
scores 1 whichever classes the split happens to contain, and the mean IoU equals what
``keras.metrics.MeanIoU(num_classes, sparse_y_pred=False)`` reports for the same
pixels. Pixel accuracy is the share of pixels whose class is right; it is dominated by
the background, which is why mean IoU is the headline number.

What the stage logs for the evaluated split (``test`` by default, metrics logged once):

* ``test_loss`` and the compiled metrics from ``model.evaluate`` (``test_accuracy``);
* ``test_miou``, ``test_dice``, ``test_pixel_accuracy``;
* with ``per_class``: ``test_iou_<class>`` and ``test_dice_<class>`` (class names made
  metric-safe), for every class present in truth or prediction.

Plots (under ``plots/``): ``learning_curves.png`` (after training),
``segmentation_masks.png`` (rows: image, true mask, predicted mask, wrong pixels with
the image's own mean IoU, for the split's first ``examples`` images; masks colour-coded
per class with a legend),
``per_class_iou.png`` (IoU and Dice bars per class, mean IoU as a line), and the
architecture's own plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.stages.reports.common import compiled_metrics, evaluation_inputs, metric_suffix

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` pixel counts: rows are true, columns predicted
    classes. Raises ``ValueError`` for mismatched shapes or labels out of range."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"mask shapes differ: true {y_true.shape}, predicted {y_pred.shape}")
    t = y_true.reshape(-1).astype(np.int64)
    p = y_pred.reshape(-1).astype(np.int64)
    for what, labels in (("true", t), ("predicted", p)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{what} mask values must lie in [0, {num_classes - 1}], found "
                f"[{labels.min()}, {labels.max()}]"
            )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` per class, ``nan`` where the denominator is 0."""
    out = np.full(len(numerator), np.nan)
    present = denominator > 0
    out[present] = numerator[present] / denominator[present]
    return out


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU ``TP / (TP + FP + FN)`` per class from a confusion matrix; ``nan`` for a class
    absent from both truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return _ratio(tp, tp + fp + fn)


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` per class; ``nan`` for absent classes."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


@dataclass
class SegmentationScores:
    """Scores of a set of predicted masks (see the module docstring for definitions)."""

    miou: float
    dice: float
    pixel_accuracy: float
    iou: np.ndarray  # per class, nan where absent
    dice_per_class: np.ndarray  # per class, nan where absent
    confusion: np.ndarray  # (classes, classes) pixel counts, rows true

    @property
    def present(self) -> np.ndarray:
        """Boolean per class: occurs in the truth or the prediction."""
        return ~np.isnan(self.iou)


def segmentation_scores(y_true: Any, y_pred: Any, num_classes: int) -> SegmentationScores:
    """Mean IoU, mean Dice, pixel accuracy and per-class scores over all pixels."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    iou = iou_per_class(cm)
    dice = dice_per_class(cm)
    total = cm.sum()
    return SegmentationScores(
        miou=_nanmean(iou),
        dice=_nanmean(dice),
        pixel_accuracy=float(np.trace(cm) / total) if total else float("nan"),
        iou=iou,
        dice_per_class=dice,
        confusion=cm,
    )


def mean_iou(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Mean IoU over the classes present in truth or prediction."""
    return segmentation_scores(y_true, y_pred, num_classes).miou


def mean_dice(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Mean Dice over the classes present in truth or prediction."""
    return segmentation_scores(y_true, y_pred, num_classes).dice


def predicted_masks(outputs: Any) -> np.ndarray:
    """Integer masks ``(n, h, w)`` from a model's per-pixel outputs.

    ``(n, h, w, classes)`` probabilities or logits take the arg-max; one channel is a
    binary foreground score (probability above 0.5, or logit above 0). A list of
    outputs (auxiliary heads) uses the first.
    """
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    out = np.asarray(outputs)
    if out.shape[-1] == 1:
        score = out[..., 0]
        probabilities = score.min(initial=0.0) >= 0.0 and score.max(initial=0.0) <= 1.0
        return (score > (0.5 if probabilities else 0.0)).astype(np.int32)
    return out.argmax(axis=-1).astype(np.int32)


def scores_as_metrics(
    scores: SegmentationScores, split: str, class_names: Sequence[str], per_class: bool = True
) -> dict[str, float]:
    """``{split}_miou``, ``{split}_dice``, ``{split}_pixel_accuracy`` and, with
    ``per_class``, ``{split}_iou_<class>`` / ``{split}_dice_<class>`` for present classes."""
    metrics = {
        f"{split}_miou": scores.miou,
        f"{split}_dice": scores.dice,
        f"{split}_pixel_accuracy": scores.pixel_accuracy,
    }
    if per_class:
        for k in map(int, np.flatnonzero(scores.present)):
            label = metric_suffix(class_names[k]) if k < len(class_names) else str(k)
            metrics[f"{split}_iou_{label}"] = float(scores.iou[k])
            metrics[f"{split}_dice_{label}"] = float(scores.dice_per_class[k])
    return metrics


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB colours in [0, 1]: class 0 (background) near black,
    the others from matplotlib's qualitative ``tab10`` (``tab20`` beyond 11 classes)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"]
    colours = [(0.08, 0.08, 0.08)]
    colours += [cmap(i % cmap.N)[:3] for i in range(num_classes - 1)]
    return np.asarray(colours[:num_classes], dtype=np.float32)


def colorize(masks: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Integer masks ``(..., h, w)`` to RGB images ``(..., h, w, 3)``."""
    return colours[np.asarray(masks, dtype=np.int64)]


def mask_grid_figure(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    num_classes: int,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Any:
    """Columns of examples; rows: the image, the true mask, the predicted mask and the
    wrongly labelled pixels (white), titled with the image's own mean IoU."""
    from matplotlib.patches import Patch

    from dlpipe.models import grids

    colours = palette(num_classes)
    n = len(images)
    wrong = y_true != y_pred
    rows = [
        ("image", grids.to_display(images, value_range)),
        ("true", colorize(y_true, colours)),
        ("predicted", colorize(y_pred, colours)),
        ("wrong", wrong[..., np.newaxis].repeat(3, axis=-1).astype(np.float32)),
    ]
    fig = grids.figure(1.0 * n + 0.6, 1.05 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, shown) in enumerate(rows):
        for i in range(n):
            grids.show(axes[r, i], shown[i])
        axes[r, 0].text(-0.1, 0.5, label, transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
    for i in range(n):
        image_miou = mean_iou(y_true[i], y_pred[i], num_classes)
        axes[-1, i].set_title(f"IoU {image_miou:.2f}, {int(wrong[i].sum())} px", fontsize=6)
    names = [class_names[k] if k < len(class_names) else str(k) for k in range(num_classes)]
    handles = [Patch(color=colours[k], label=names[k]) for k in range(num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(num_classes, 6), fontsize=7,
               frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.98, bottom=0.1, hspace=0.25, wspace=0.06)
    return fig


def per_class_figure(scores: SegmentationScores, class_names: Sequence[str]) -> Any:
    """IoU and Dice bars per class, absent classes marked, mean IoU as a dashed line."""
    from dlpipe.models import grids

    k = len(scores.iou)
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(k)]
    positions = np.arange(k)
    fig = grids.figure(1.0 + 0.9 * k, 3.6)
    ax = fig.subplots()
    iou = np.nan_to_num(scores.iou)
    dice = np.nan_to_num(scores.dice_per_class)
    bars = ax.bar(positions - 0.2, iou, width=0.4, label="IoU", color="tab:blue")
    ax.bar(positions + 0.2, dice, width=0.4, label="Dice", color="tab:orange", alpha=0.8)
    for i, bar in enumerate(bars):
        text = f"{scores.iou[i]:.3f}" if scores.present[i] else "absent"
        ax.text(bar.get_x() + bar.get_width() / 2, iou[i] + 0.02, text, ha="center",
                va="bottom", fontsize=7)
    ax.axhline(scores.miou, ls="--", color="tab:blue", lw=1, label=f"mean IoU {scores.miou:.3f}")
    ax.set_xticks(positions, names, rotation=30 if k > 6 else 0, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.set_title(f"per-class IoU and Dice (mean Dice {scores.dice:.3f})", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def _true_masks(y: Any, stage: str, split: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 4 and y.shape[-1] == 1:
        y = y[..., 0]
    if y.ndim != 3:
        raise DlpipeError(
            f"stage {stage!r}: segmentation_report needs integer masks (n, height, width) "
            f"as labels, the {split!r} split has labels of shape {y.shape}"
        )
    return y.astype(np.int64)


def segmentation_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, stage = evaluation_inputs(ctx, split, "segmentation_report", targets="masks")

    x = np.asarray(data.x[split])
    y = _true_masks(data.y[split], stage, split)
    metrics: dict[str, float] = {}
    if getattr(model, "compiled", False):
        metrics.update(compiled_metrics(model, data, split, params.batch_size))
    predicted = predicted_masks(model.predict(x, batch_size=params.batch_size, verbose=0))
    if predicted.shape != y.shape:
        raise DlpipeError(
            f"stage {stage!r}: the model predicts masks of shape {predicted.shape[1:]}, the "
            f"data's masks are {y.shape[1:]}; segmentation_report needs per-pixel outputs"
        )
    num_classes = int(data.num_classes or 0) or int(max(y.max(), predicted.max())) + 1
    names = list(data.class_names) or [str(k) for k in range(num_classes)]
    scores = segmentation_scores(y, predicted, num_classes)
    metrics.update(scores_as_metrics(scores, split, names, params.per_class))
    ctx.log_metrics(metrics)

    print(f"segmentation_report ({split}, {len(y)} images):")
    for key in (f"{split}_loss", f"{split}_miou", f"{split}_dice", f"{split}_pixel_accuracy"):
        if key in metrics:
            print(f"  {key:<24} {metrics[key]:.4f}")
    for k in range(num_classes):
        label = names[k] if k < len(names) else str(k)
        iou = "absent" if not scores.present[k] else f"{scores.iou[k]:.4f}"
        print(f"  IoU {label:<20} {iou}")

    if not params.plots:
        return
    from dlpipe.plotting import learning_curves_figure

    if ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    if params.examples > 0:
        n = min(params.examples, len(x))
        low, high = getattr(data, "value_range", (0.0, 1.0))
        fig = mask_grid_figure(
            x[:n], y[:n], predicted[:n], names, num_classes, (float(low), float(high))
        )
        ctx.log_figure(fig, "segmentation_masks.png")
    ctx.log_figure(per_class_figure(scores, names), "per_class_iou.png")
    entry = ctx.model_entry()
    plotter = entry.plotter() if entry else None
    if plotter is not None:
        for filename, figure in plotter(ctx, model, data):
            ctx.log_figure(figure, filename)
