"""The ``detection_report`` evaluate stage: how well a detector finds and labels objects.

The model must offer ``detect(x, score_threshold, iou_threshold, max_detections,
batch_size)`` returning one :class:`dlpipe.models.yolo.boxes.Detections` per image (the
``yolo`` architecture does: it decodes its grid and applies per-class NMS). Targets are
the padded ``(n, max_objects, 5)`` rows of the ``shapes_detection`` data stage.

Metrics (logged once, for the evaluated split, ``test`` by default):

* ``test_loss`` and whatever else ``model.evaluate`` reports (the YOLO loss terms);
* ``test_map50`` (mAP@0.5, VOC-style), ``test_map75`` and ``test_map50_95`` (COCO's
  mean over IoU 0.5, 0.55, ..., 0.95); all-point interpolated AP per class, averaged
  over the classes that have ground truth;
* ``test_ap50_<class name>`` per class.

Plots (under ``plots/``): ``detections.png`` (images with predicted boxes, labelled
with class and score, and the true boxes dashed), ``pr_curves.png`` (precision/recall
per class at IoU 0.5), ``learning_curves.png`` after training, and the model's own
plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.models import grids
from dlpipe.models.yolo.boxes import (
    COCO_IOU_THRESHOLDS,
    Detections,
    GroundTruth,
    ground_truth,
    mean_average_precision,
    precision_recall,
)
from dlpipe.plotting import learning_curves_figure
from dlpipe.stages.reports.common import compiled_metrics, evaluation_inputs, metric_suffix

#: Box colours by class index (matplotlib's tab10).
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def _name(names: Sequence[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else str(k)


def detection_metrics(
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    class_names: Sequence[str],
    split: str,
) -> dict[str, float]:
    """``{split}_map50``, ``_map75``, ``_map50_95`` and ``_ap50_<class>`` (classes with
    ground truth only)."""
    result = mean_average_precision(preds, truths, COCO_IOU_THRESHOLDS, len(class_names))
    metrics = {
        f"{split}_map50": result.at(0.5),
        f"{split}_map75": result.at(0.75),
        f"{split}_map50_95": result.value,
    }
    for k, ap in enumerate(result.per_class(0.5)):
        if not math.isnan(ap):
            metrics[f"{split}_ap50_{metric_suffix(_name(class_names, k))}"] = float(ap)
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _draw_box(ax: Any, box: np.ndarray, side: tuple[int, int], **style: Any) -> None:
    from matplotlib.patches import Rectangle

    h, w = side
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, **style))


def detections_figure(
    x: np.ndarray,
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    class_names: Sequence[str],
    value_range: tuple[float, float] = (0.0, 1.0),
    draw_threshold: float = 0.3,
    count: int = 16,
    cols: int = 4,
) -> Any:
    """A grid of images: true boxes dashed white, predictions in class colours with
    ``class score`` labels (only those scoring at least ``draw_threshold``)."""
    count = min(count, len(x))
    cols = max(1, min(cols, count))
    rows = max(1, math.ceil(count / cols))
    fig = grids.figure(2.2 * cols, 2.3 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    images = grids.to_display(x[:count], value_range)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= count:
            continue
        h, w = images[i].shape[:2]
        image = images[i][..., 0] if images[i].shape[-1] == 1 else images[i][..., :3]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0),
                  interpolation="nearest", vmin=0.0, vmax=1.0)
        for box in truths[i].boxes:
            _draw_box(ax, box, (h, w), edgecolor="white", linestyle="--", linewidth=1.0)
        shown = 0
        for box, score, cls in zip(*preds[i], strict=True):
            if score < draw_threshold:
                continue
            shown += 1
            color = COLORS[int(cls) % len(COLORS)]
            _draw_box(ax, box, (h, w), edgecolor=color, linewidth=1.6)
            ax.text(float(box[0]) * w, float(box[1]) * h, f"{_name(class_names, int(cls))} {score:.2f}",
                    fontsize=6, color="white", va="bottom", ha="left",
                    bbox={"facecolor": color, "edgecolor": "none", "pad": 0.8, "alpha": 0.85})
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"{shown} found / {len(truths[i].boxes)} true", fontsize=7)
    fig.suptitle(
        f"detections (score >= {draw_threshold:g}, solid) and ground truth (dashed)", fontsize=9
    )
    fig.tight_layout()
    return fig


def pr_curves_figure(
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> Any:
    """Precision/recall per class at one IoU threshold, AP in the legend."""
    fig = grids.figure(5.0, 4.2)
    ax = fig.subplots()
    for k, name in enumerate(class_names):
        curve = precision_recall(preds, truths, k, iou_threshold)
        if curve.num_truths == 0:
            continue
        recall = np.concatenate([[0.0], curve.recall])
        precision = np.concatenate([[1.0], curve.precision])
        ax.step(recall, precision, where="post", color=COLORS[k % len(COLORS)],
                label=f"{name} (AP {curve.ap:.3f}, {curve.num_truths} objects)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall per class at IoU {iou_threshold:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def detection_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, stage = evaluation_inputs(ctx, split, "detection_report")
    y = data.y.get(split)
    if y is None or np.ndim(y) != 3 or np.shape(y)[-1] != 5:
        raise DlpipeError(
            f"stage {stage!r}: detection_report needs padded box targets (n, max_objects, 5) "
            f"of [class, x0, y0, x1, y1] rows (the shapes_detection data stage); got "
            f"{None if y is None else np.shape(y)}"
        )
    detect = getattr(model, "detect", None)
    if not callable(detect):
        raise DlpipeError(
            f"stage {stage!r}: the model ({type(model).__name__}) has no detect() method; "
            "detection_report works with detectors such as the yolo architecture"
        )

    x = np.asarray(data.x[split], dtype="float32")
    metrics = compiled_metrics(model, data, split, params.batch_size)
    preds = detect(
        x,
        score_threshold=params.score_threshold,
        iou_threshold=params.iou_threshold,
        max_detections=params.max_detections,
        batch_size=params.batch_size,
    )
    truths = ground_truth(np.asarray(y))
    num_classes = int(data.num_classes or 0)
    if num_classes < 1:  # not declared by the data: the largest label seen
        num_classes = 1 + max((int(t.classes.max()) for t in truths if len(t.classes)), default=0)
    names = list(data.class_names) or [str(k) for k in range(num_classes)]
    metrics.update(detection_metrics(preds, truths, names[:num_classes], split))
    ctx.log_metrics(metrics)

    objects = sum(len(t.classes) for t in truths)
    found = sum(int(np.sum(p.scores >= params.draw_threshold)) for p in preds)
    print(f"detection_report ({split}, {len(x)} images, {objects} objects, "
          f"{found} detections scoring >= {params.draw_threshold:g}):")
    for key, value in metrics.items():
        if "map" in key or "_ap50_" in key or key == f"{split}_loss":
            print(f"  {key:<24} {value:.4f}")

    if not params.plots:
        return
    if ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    if params.images > 0:
        low, high = getattr(data, "value_range", (0.0, 1.0))
        fig = detections_figure(x, preds, truths, names, (float(low), float(high)),
                                params.draw_threshold, params.images)
        ctx.log_figure(fig, "detections.png")
    ctx.log_figure(pr_curves_figure(preds, truths, names[:num_classes]), "pr_curves.png")
    entry = ctx.model_entry()
    plotter = entry.plotter() if entry else None
    if plotter is not None:
        for filename, figure in plotter(ctx, model, data):
            ctx.log_figure(figure, filename)
