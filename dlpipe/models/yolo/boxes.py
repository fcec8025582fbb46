"""Object-detection arithmetic in plain NumPy: IoU, NMS, decoding a YOLO grid, mAP.

Boxes are ``[x_min, y_min, x_max, y_max]`` rows in image-relative coordinates (0..1),
the layout of the ``shapes_detection`` data stage. Nothing here imports Keras, so the
evaluation code can be tested and reused without a model.

* :func:`iou` -- the pairwise intersection-over-union matrix of two box sets;
* :func:`nms` -- greedy non-maximum suppression; :func:`batched_nms` does it per class;
* :func:`decode_grid` -- a YOLO-v1 output grid to per-image :class:`Detections`;
* :func:`mean_average_precision` -- VOC/COCO-style mAP: per class, detections are
  matched greedily (highest score first) to unmatched ground truth of the same class
  at an IoU threshold, and the precision/recall curve is integrated with all-point
  interpolation (:func:`average_precision`); classes are averaged, then thresholds.
  ``iou_thresholds=(0.5,)`` gives mAP@0.5; :data:`COCO_IOU_THRESHOLDS` gives
  mAP@0.5:0.95.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: The ten IoU thresholds of COCO's mAP@[0.5:0.95].
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(
    round(float(t), 2) for t in np.linspace(0.5, 0.95, 10)
)


class Detections(NamedTuple):
    """What a detector found in one image (rows sorted by descending score)."""

    boxes: np.ndarray  # (n, 4) float: x_min, y_min, x_max, y_max
    scores: np.ndarray  # (n,) float
    classes: np.ndarray  # (n,) int


class GroundTruth(NamedTuple):
    """The true objects of one image."""

    boxes: np.ndarray  # (m, 4)
    classes: np.ndarray  # (m,) int


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def _as_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64)
    if out.size == 0:
        return out.reshape(0, 4)
    return out.reshape(-1, 4)


def area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``(n, 4)`` boxes; inverted boxes count as empty."""
    b = _as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``boxes_a`` with every box in ``boxes_b``.

    :returns: an ``(len(a), len(b))`` matrix in [0, 1]; 0 where the union is empty.
    """
    a, b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5, max_output: int | None = None
) -> np.ndarray:
    """Greedy non-maximum suppression.

    Take the highest-scoring box, drop every remaining box that overlaps it by more
    than ``iou_threshold``, repeat. :returns: indices of the kept boxes, by descending
    score (at most ``max_output``).
    """
    b = _as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    limit = len(order) if max_output is None else max_output
    while len(order) and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap = iou(b[best : best + 1], b[rest])[0]
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float = 0.5,
    max_output: int | None = None,
) -> np.ndarray:
    """:func:`nms` within each class: boxes of different classes never suppress each
    other. (Each class is shifted to its own region of the plane, then one NMS runs.)"""
    b = _as_boxes(boxes)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    c = np.asarray(classes).reshape(-1)
    span = float(max(b.max() - b.min(), 0.0)) + 1.0
    shifted = b + (c.astype(np.float64) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_output)


# --------------------------------------------------------------------------------------
# Decoding a YOLO-v1 grid
# --------------------------------------------------------------------------------------


def grid_boxes(output: np.ndarray, boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``B`` predicted boxes of every cell of a YOLO-v1 output grid.

    :param output: ``(n, S, S, 5 * B + C)``; per cell ``B`` groups of
        ``[x, y, sqrt(w), sqrt(h), confidence]`` (x, y relative to the cell, w, h to the
        image), then ``C`` class probabilities.
    :returns: ``(n, S, S, B, 4)`` corner boxes (clipped to the image) and their
        ``(n, S, S, B)`` confidences.
    """
    out = np.asarray(output, dtype=np.float64)
    n, rows, cols = out.shape[:3]
    pred = out[..., : 5 * boxes].reshape(n, rows, cols, boxes, 5)
    col = np.arange(cols, dtype=np.float64)[None, None, :, None]
    row = np.arange(rows, dtype=np.float64)[None, :, None, None]
    cx = (col + pred[..., 0]) / cols
    cy = (row + pred[..., 1]) / rows
    w = np.square(pred[..., 2])
    h = np.square(pred[..., 3])
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    return np.clip(corners, 0.0, 1.0), pred[..., 4]


def decode_grid(
    output: np.ndarray,
    boxes: int,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 20,
) -> list[Detections]:
    """Per-image detections from YOLO-v1 outputs ``(n, S, S, 5 * B + C)``.

    Each predicted box takes its cell's most probable class; its score is the paper's
    class-specific confidence ``confidence * P(class | object)``. Boxes scoring below
    ``score_threshold`` are dropped, then :func:`batched_nms` with ``iou_threshold``
    keeps at most ``max_detections`` per image.
    """
    out = np.asarray(output, dtype=np.float64)
    n = out.shape[0]
    corners, confidence = grid_boxes(out, boxes)
    probs = out[..., 5 * boxes :]
    cls = np.broadcast_to(probs.argmax(axis=-1)[..., None], confidence.shape)
    scores = confidence * probs.max(axis=-1)[..., None]
    results = []
    for i in range(n):
        b = corners[i].reshape(-1, 4)
        s = scores[i].reshape(-1)
        c = cls[i].reshape(-1)
        keep = np.flatnonzero(s >= score_threshold)
        b, s, c = b[keep], s[keep], c[keep]
        kept = batched_nms(b, s, c, iou_threshold, max_detections)
        results.append(Detections(b[kept], s[kept], c[kept].astype(np.int64)))
    return results


def ground_truth(y: np.ndarray) -> list[GroundTruth]:
    """Padded ``(n, max_objects, 5)`` rows ``[class, x0, y0, x1, y1]`` (class -1 is
    padding) -> one :class:`GroundTruth` per image."""
    y = np.asarray(y, dtype=np.float64)
    out = []
    for rows in y:
        real = rows[rows[:, 0] >= 0]
        out.append(GroundTruth(real[:, 1:5], real[:, 0].astype(np.int64)))
    return out


# --------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under a precision/recall curve with all-point interpolation (VOC 2010+).

    The precision at each recall becomes the best precision at that recall or beyond
    (the curve's upper envelope), and the envelope is integrated over recall.
    ``recall`` must be non-decreasing (detections taken in descending score order).
    """
    r = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


@dataclass(frozen=True)
class PRCurve:
    """One class's precision/recall curve at one IoU threshold."""

    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    num_truths: int

    @property
    def ap(self) -> float:
        """All-point interpolated AP; NaN when the class has no ground truth."""
        if self.num_truths == 0:
            return float("nan")
        return average_precision(self.recall, self.precision)


def _match(
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    class_id: int,
    iou_thresholds: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy matching of one class's detections, over all images, per threshold.

    :returns: scores (descending), a ``(thresholds, detections)`` true-positive mask,
        and the number of ground-truth objects of the class.
    """
    image_ids: list[int] = []
    det_index: list[int] = []
    det_scores: list[float] = []
    overlaps: list[np.ndarray] = []
    num_truths = 0
    for i, (p, t) in enumerate(zip(preds, truths, strict=True)):
        dets = np.flatnonzero(np.asarray(p.classes) == class_id)
        gts = np.flatnonzero(np.asarray(t.classes) == class_id)
        num_truths += len(gts)
        overlaps.append(iou(_as_boxes(p.boxes)[dets], _as_boxes(t.boxes)[gts]))
        image_ids.extend([i] * len(dets))
        det_index.extend(range(len(dets)))
        det_scores.extend(np.asarray(p.scores, dtype=np.float64).reshape(-1)[dets])
    scores = np.asarray(det_scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    tp = np.zeros((len(thresholds), len(order)), dtype=bool)
    for ti, threshold in enumerate(thresholds):
        taken = [np.zeros(m.shape[1], dtype=bool) for m in overlaps]
        for rank, k in enumerate(order):
            image, d = image_ids[k], det_index[k]
            row = overlaps[image][d]
            if row.size == 0:
                continue
            candidates = np.where(taken[image], -1.0, row)
            best = int(np.argmax(candidates))
            if candidates[best] >= threshold:
                taken[image][best] = True
                tp[ti, rank] = True
    return scores[order], tp, num_truths


def precision_recall(
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    class_id: int,
    iou_threshold: float = 0.5,
) -> PRCurve:
    """The precision/recall curve of class ``class_id`` at one IoU threshold."""
    scores, tp, num_truths = _match(preds, truths, class_id, (iou_threshold,))
    return _curve(scores, tp[0], num_truths)


def _curve(scores: np.ndarray, tp: np.ndarray, num_truths: int) -> PRCurve:
    hits = np.cumsum(tp)
    ranks = np.arange(1, len(tp) + 1)
    recall = hits / max(num_truths, 1)
    precision = hits / ranks if len(tp) else np.zeros(0)
    return PRCurve(recall, precision, scores, num_truths)


@dataclass(frozen=True)
class MAPResult:
    """What :func:`mean_average_precision` returns."""

    #: mAP: the mean over thresholds of the mean AP over classes with ground truth.
    value: float
    #: ``(thresholds, classes)`` AP; NaN for classes without ground truth.
    ap: np.ndarray
    iou_thresholds: tuple[float, ...]

    def per_class(self, iou_threshold: float) -> np.ndarray:
        """AP of every class at one of the thresholds."""
        index = int(np.argmin(np.abs(np.asarray(self.iou_thresholds) - iou_threshold)))
        return self.ap[index]

    def at(self, iou_threshold: float) -> float:
        """mAP at one of the thresholds."""
        return _nanmean(self.per_class(iou_threshold))


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_average_precision(
    preds: Sequence[Detections],
    truths: Sequence[GroundTruth],
    iou_thresholds: Sequence[float] = (0.5,),
    num_classes: int | None = None,
) -> MAPResult:
    """Mean average precision of ``preds`` against ``truths`` (one entry per image).

    :param preds: per image ``(boxes, scores, classes)`` (e.g. :class:`Detections`).
    :param truths: per image ``(boxes, classes)`` (e.g. :class:`GroundTruth`).
    :param iou_thresholds: ``(0.5,)`` for mAP@0.5, :data:`COCO_IOU_THRESHOLDS` for
        mAP@0.5:0.95.
    :param num_classes: classes to score; default: every class seen in ``truths`` or
        ``preds``. Classes without ground truth get AP NaN and are left out of the mean.
    """
    preds = [Detections(*p) for p in preds]
    truths = [GroundTruth(*t) for t in truths]
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction entries but {len(truths)} ground-truth entries")
    if num_classes is None:
        seen = [np.asarray(t.classes).reshape(-1) for t in truths]
        seen += [np.asarray(p.classes).reshape(-1) for p in preds]
        labels = np.concatenate(seen) if seen else np.zeros(0)
        num_classes = int(labels.max()) + 1 if labels.size else 0
    thresholds = tuple(float(t) for t in iou_thresholds)
    ap = np.full((len(thresholds), num_classes), np.nan)
    for c in range(num_classes):
        scores, tp, num_truths = _match(preds, truths, c, thresholds)
        if num_truths == 0:
            continue
        for ti in range(len(thresholds)):
            ap[ti, c] = _curve(scores, tp[ti], num_truths).ap
    per_threshold = [_nanmean(row) for row in ap] if num_classes else [float("nan")]
    value = float(np.mean(per_threshold)) if per_threshold else float("nan")
    return MAPResult(value=value, ap=ap, iou_thresholds=thresholds)
