"""Evaluation reports: a family's test metrics and the figures people look at.

One module per report; this package declares their parameters and registers them.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class ClassifierReportParams(Params):
    """A classifier's test metrics and diagnostic plots."""

    split: Literal["test", "val", "train"] = Field("test", description="The split to evaluate.")
    batch_size: int = Field(256, ge=1, description="Batch size for prediction.")
    per_class: bool = Field(True, description="Log precision and recall of every class.")
    plots: bool = Field(
        True,
        description="Learning curves, confusion matrix, worst misclassified examples, "
        "ROC and PR curves (binary), and the model's own plots.",
    )
    worst: int = Field(
        16, ge=0, le=100, description="Misclassified examples to show (0: no grid)."
    )


class SegmentationReportParams(Params):
    """Mean IoU, Dice and pixel accuracy on a split, with mask and per-class plots."""

    split: Literal["test", "val", "train"] = "test"
    batch_size: int = Field(256, ge=1)
    examples: int = Field(
        8, ge=0, le=32, description="Images in the image / true mask / predicted mask grid."
    )
    per_class: bool = Field(True, description="Also log IoU and Dice of every class.")
    plots: bool = Field(
        True, description="Learning curves, the mask grid, per-class IoU and the model's plots."
    )


class DetectionReportParams(Params):
    """mAP@0.5, mAP@0.5:0.95 and per-class AP50 on a split, plus drawn detections."""

    split: Literal["test", "val", "train"] = "test"
    batch_size: int = Field(128, ge=1)
    score_threshold: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Drop boxes scoring below this before NMS (low keeps recall for mAP).",
    )
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0, description="NMS IoU threshold.")
    max_detections: int = Field(20, ge=1, description="Most detections kept per image.")
    draw_threshold: float = Field(
        0.3, ge=0.0, le=1.0, description="Only detections scoring at least this are drawn."
    )
    images: int = Field(16, ge=0, le=64, description="Test images drawn with their boxes.")
    plots: bool = Field(True, description="Detections grid, PR curves, learning curves.")


class Seq2SeqReportParams(Params):
    """Greedy decoding of a split, sequence metrics, examples and attention maps."""

    split: Literal["test", "val", "train"] = Field("test", description="Split to decode.")
    batch_size: int = Field(256, ge=1, description="Decoding batch size.")
    beam_width: int = Field(
        0, ge=0, description="Also decode with beam search of this width (0: skip); logs "
        "<split>_beam_sequence_accuracy."
    )
    examples: int = Field(20, ge=0, description="Rows of the examples table (examples.md).")
    attention_maps: bool = Field(True, description="Log the model's attention heat-maps.")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")
    length_bucket_width: int = Field(
        5, ge=1, description="Source lengths (tokens) per bucket of the "
        "<split>_seq_acc_len_<lo>_<hi> metrics; buckets are aligned to multiples of it."
    )
    length_buckets: list[int] | None = Field(
        None, min_length=1, description="Explicit bucket lower bounds instead, e.g. [0, 15, 20] "
        "for lengths 0-14, 15-19 and 20 and longer."
    )


class ClipReportParams(Params):
    """Zero-shot classification, retrieval recall@k and a similarity matrix."""

    split: Literal["test", "val", "train"] = Field("test", description="Held-out split.")
    batch_size: int = Field(256, ge=1, description="Embedding batch size.")
    prompts: list[str] | None = Field(
        None, min_length=1, description="Zero-shot prompt templates, averaged per class, e.g. "
        "['a photo of the number {digit}', 'a {word}']; placeholders are the data's class "
        "fields. Default: the data's caption templates."
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1,
                          description="Recall@k cut-offs.")
    match: Literal["label", "caption", "pair"] = Field(
        "label", description="Relevant in retrieval: same class, same caption text, or only "
        "the own pair."
    )
    matrix_size: int = Field(10, ge=0, le=40, description="Pairs in the similarity-matrix "
                             "plot, one per class first (0: no plot).")
    confusion_matrix: bool = Field(True, description="Log the zero-shot confusion matrix.")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")

    @model_validator(mode="after")
    def _ks(self) -> ClipReportParams:
        if any(k < 1 for k in self.ks):
            raise ValueError("every k must be at least 1")
        return self


class CaptionReportParams(Params):
    """Greedy (and beam) captions of a held-out split."""

    split: Literal["test", "val", "train"] = Field("test", description="Held-out split.")
    batch_size: int = Field(256, ge=1, description="Decoding batch size.")
    beam_width: int = Field(0, ge=0, description="Also decode with beam search of this width "
                            "(> 1; 0: skip).")
    examples: int = Field(16, ge=0, description="Images in the caption grid (0: none).")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")


class QualityClassifierParams(Params):
    """The judge: a small classifier trained once per dataset and cached under mlruns/."""

    filters: list[int] = Field(
        default_factory=lambda: [32, 64],
        min_length=1,
        description="Images: filters per stride-2 conv block; other data: dense widths.",
    )
    features: int = Field(
        64, ge=2, le=1024, description="Width of the penultimate layer (the Frechet features)."
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="Dropout before the softmax.")
    epochs: int = Field(15, ge=1, le=500, description="Training epochs (only when not cached).")
    batch_size: int = Field(64, ge=1, description="Training batch size.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate.")
    retrain: bool = Field(
        False, description="Train a new classifier even when a cached one matches."
    )


class SampleQualityParams(Params):
    """Confidence, class coverage, an Inception-score stand-in and a Frechet distance."""

    split: Literal["test", "val", "train"] = Field(
        "test", description="Held-out real images: the reference for the Frechet distance."
    )
    num_samples: int = Field(1000, ge=10, le=100_000, description="Generated samples to score.")
    seed: int = Field(
        0, description="Seeds the samples' noise (and the classifier's training, if it trains)."
    )
    coverage_share: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="A class is covered when at least this share of samples is classified "
        "as it; null: 1/(2K) for K classes (half its share under a uniform spread).",
    )
    batch_size: int = Field(256, ge=1, description="Batch size for generation and prediction.")
    classifier: QualityClassifierParams = Field(
        default_factory=QualityClassifierParams,
        description="The judge classifier.",
    )
    plots: bool = Field(
        True, description="Log predicted-class shares and the most/least convincing samples."
    )


@hookimpl
def register_stages(register):
    register(
        "evaluate", "classifier_report", "dlpipe.stages.reports.classifier:classifier_report",
        ClassifierReportParams,
        "Classifier metrics (accuracy, per-class precision/recall) and diagnostic plots.",
    )
    register("evaluate", "segmentation_report",
             "dlpipe.stages.reports.segmentation:segmentation_report", SegmentationReportParams,
             "Mean IoU, Dice, per-class IoU and pixel accuracy; mask grid and IoU bars.")
    register("evaluate", "detection_report", "dlpipe.stages.reports.detection:detection_report",
             DetectionReportParams,
             "Detection mAP@0.5 and @0.5:0.95, per-class AP, drawn boxes and PR curves.")
    register("evaluate", "seq2seq_report", "dlpipe.stages.reports.seq2seq:seq2seq_report",
             Seq2SeqReportParams,
             "Greedy (and beam) decoding: sequence/token accuracy, examples, attention maps.")
    register("evaluate", "clip_report", "dlpipe.stages.reports.clip:clip_report",
             ClipReportParams,
             "Dual encoder: zero-shot accuracy, retrieval recall@k, similarity matrix.")
    register("evaluate", "caption_report", "dlpipe.stages.reports.caption:caption_report",
             CaptionReportParams,
             "Captioner: exact match and token accuracy of generated captions, caption grid.")
    register(
        "evaluate",
        "sample_quality",
        "dlpipe.stages.reports.sample_quality:sample_quality",
        SampleQualityParams,
        "Generated samples judged by a cached classifier: confidence, coverage, "
        "IS-like score, Frechet distance (FID stand-in).",
    )
