"""Built-in evaluate stage ``sample_quality``: offline scores for generated samples.

The code lives in :mod:`dlpipe.stages.reports.sample_quality`; this module only declares the
parameters and registers a ``"module:function"`` string, so it imports neither Keras
nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


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
        "evaluate",
        "sample_quality",
        "dlpipe.stages.reports.sample_quality:sample_quality",
        SampleQualityParams,
        "Generated samples judged by a cached classifier: confidence, coverage, "
        "IS-like score, Frechet distance (FID stand-in).",
    )
