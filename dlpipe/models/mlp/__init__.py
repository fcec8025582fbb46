"""Supervised vision classifiers and their shared evaluation stage.

Architectures (code in :mod:`dlpipe.models`): ``mlp``, ``lenet``, ``alexnet``, ``vgg``,
``inception``, ``resnet`` and ``mobilenet``, all ``task: classification`` models that
output class probabilities; and the ``classifier_report`` evaluate stage (code in
:mod:`dlpipe.stages.reports.classifier`). Nothing here imports Keras.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params

Stem = Literal["auto", "imagenet", "small"]


def width_field(default: float = 1.0) -> Any:
    return Field(default, gt=0.0, le=4.0, description="Width multiplier: scales every filter count.")


class MLPParams(Params):
    """Flatten, then Dense -> norm -> activation -> dropout blocks, then a softmax."""

    hidden: list[int] | None = Field(
        None, description="Hidden layer widths, one per layer; overrides width and depth."
    )
    width: int = Field(128, ge=1, description="Units per hidden layer (when hidden is unset).")
    depth: int = Field(2, ge=0, description="Number of hidden layers (when hidden is unset).")
    activation: str = Field("relu", description="Keras activation of the hidden layers.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    norm: Literal["none", "batch", "layer", "instance"] = Field(
        "none", description="Normalization after each hidden Dense layer."
    )

    @model_validator(mode="after")
    def _widths(self) -> MLPParams:
        if self.hidden is not None and any(w < 1 for w in self.hidden):
            raise ValueError("hidden widths must be positive")
        return self


class LeNetParams(Params):
    """LeNet-5: tanh convolutions with average pooling, then 120-84 dense layers."""

    filters: tuple[int, int] = Field((6, 16), description="Filters of C1 and C3.")
    units: tuple[int, int] = Field((120, 84), description="Units of C5 and F6.")
    activation: str = Field("tanh", description="Activation (tanh in the paper).")
    padding: Literal["auto", "valid", "same"] = Field(
        "auto",
        description="Convolution padding; auto is valid (the paper) for inputs of 32x32 "
        "and larger, same for smaller inputs.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the output layer.")
    norm: Literal["none", "batch", "layer", "instance"] = Field(
        "none",
        description="Normalization between each convolution and its activation (not in "
        "the paper): batch, layer (over height, width, channels) or instance (per channel).",
    )


class AlexNetParams(Params):
    """AlexNet: five ReLU convolutions, overlapping max pooling, two big dense layers."""

    width: float = Field(0.25, gt=0.0, le=4.0, description="Scales filters and dense widths.")
    head: list[int] = Field(
        default_factory=lambda: [4096, 4096],
        description="Dense widths before the output (scaled by width).",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout after each dense layer.")
    batch_norm: bool = Field(False, description="Batch normalization after each convolution.")
    stem: Stem = Field(
        "auto",
        description="imagenet: 11x11 stride-4 first convolution; small: 5x5 stride 1; "
        "auto: imagenet from 64x64 up.",
    )


class VGGParams(Params):
    """VGG: blocks of 3x3 convolutions and max pooling, then a dense head."""

    depth: Literal[11, 13, 16, 19] = Field(16, description="VGG-11, -13, -16 or -19.")
    width: float = width_field()
    batch_norm: bool = Field(False, description="Batch normalization after each convolution.")
    head: list[int] = Field(
        default_factory=lambda: [4096, 4096],
        description="Dense widths of the classifier head ([] for none).",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout after each head layer.")
    pooling: Literal["flatten", "avg", "max"] = Field(
        "flatten", description="How the last feature map becomes a vector."
    )


class InceptionParams(Params):
    """GoogLeNet: nine inception blocks, global average pooling, auxiliary classifiers."""

    width: float = width_field()
    blocks: tuple[int, int, int] = Field(
        (2, 5, 2),
        description="Inception blocks in groups 3, 4 and 5 (GoogLeNet: [2, 5, 2], the most).",
    )
    aux_heads: bool = Field(
        True,
        description="Auxiliary classifiers after blocks 4a and 4d (loss terms aux1, aux2).",
    )
    aux_weight: float = Field(
        0.3,
        ge=0.0,
        description="Initial weight of each auxiliary loss term; train.loss_weights.aux1 "
        "and .aux2 override it.",
    )
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="Dropout before the main output.")
    aux_dropout: float = Field(0.7, ge=0.0, lt=1.0, description="Dropout in the auxiliary heads.")
    batch_norm: bool = Field(True, description="Batch normalization after each convolution.")
    stem: Stem = Field(
        "auto",
        description="imagenet: the paper's stem (7x7 stride 2 and two poolings); small: two "
        "3x3 convolutions and one pooling; auto: imagenet from 64x64 up.",
    )


    @model_validator(mode="after")
    def _blocks(self) -> InceptionParams:
        if not all(1 <= n <= most for n, most in zip(self.blocks, (2, 5, 2), strict=True)):
            raise ValueError(f"blocks must be between [1, 1, 1] and [2, 5, 2], got {list(self.blocks)}")
        return self


class ResNetParams(Params):
    """ResNet: residual basic (18/34) or bottleneck (50/101/152) blocks."""

    depth: Literal[18, 34, 50, 101, 152] = Field(18, description="Number of layers.")
    width: float = width_field()
    stem: Stem = Field(
        "auto",
        description="imagenet: 7x7 stride-2 convolution and max pooling; small: one 3x3 "
        "stride-1 convolution (CIFAR-style); auto: imagenet from 64x64 up.",
    )
    zero_init_residual: bool = Field(
        True, description="Start each block's last batch-norm scale at 0 (blocks start as identity)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the output layer.")


class MobileNetParams(Params):
    """MobileNet: depthwise-separable convolutions with optional dilation and groups."""

    width: float = Field(1.0, gt=0.0, le=4.0, description="Width multiplier alpha.")
    output_stride: Literal[8, 16, 32] | None = Field(
        None,
        description="Use dilated convolutions instead of downsampling beyond this total "
        "stride (null: never).",
    )
    groups: int = Field(
        1, ge=1, description="Groups of the pointwise convolutions (followed by a channel shuffle)."
    )
    stem_stride: Literal["auto", 1, 2] = Field(
        "auto", description="Stride of the first convolution; auto: 2 from 64x64 up."
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the output layer.")


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




@hookimpl
def register_models(register):
    common = {"task": "classification"}
    register(
        "mlp", build="dlpipe.models.mlp.model:build", params=MLPParams,
        description="Multilayer perceptron for images or tables.",
        example_params={"hidden": [16, 8], "norm": "batch"}, **common,
    )
    register(
        "lenet", build="dlpipe.models.lenet.model:build", params=LeNetParams,
        description="LeNet-5: tanh convolutions, average pooling (LeCun et al., 1998).",
        example_params={"filters": [4, 8], "units": [16, 8]}, **common,
    )
    register(
        "alexnet", build="dlpipe.models.alexnet.model:build", params=AlexNetParams,
        description="AlexNet, scaled by a width multiplier: ReLU, dropout, overlapping pooling.",
        example_params={"width": 0.05, "head": [64, 64]}, **common,
    )
    register(
        "vgg", build="dlpipe.models.vgg.model:build", params=VGGParams,
        description="VGG-11/13/16/19: stacked 3x3 convolutions, optional batch norm.",
        example_params={"depth": 11, "width": 0.0625, "head": [16], "batch_norm": True},
        **common,
    )
    register(
        "inception", build="dlpipe.models.inception.model:build", params=InceptionParams,
        description="GoogLeNet / Inception v1 with auxiliary classifiers (named loss terms).",
        loss_weights=("main", "aux1", "aux2"),
        example_params={"width": 0.0625, "blocks": [1, 2, 1]}, **common,
    )
    register(
        "resnet", build="dlpipe.models.resnet.model:build", params=ResNetParams,
        description="ResNet-18/34 (basic blocks), 50/101/152 (bottlenecks).",
        example_params={"depth": 18, "width": 0.125}, **common,
    )
    register(
        "mobilenet", build="dlpipe.models.mobilenet.model:build", params=MobileNetParams,
        description="MobileNet: depthwise-separable convolutions, dilation, groups.",
        example_params={"width": 0.125, "groups": 2, "output_stride": 8}, **common,
    )


@hookimpl
def register_stages(register):
    register(
        "evaluate", "classifier_report", "dlpipe.stages.reports.classifier:classifier_report",
        ClassifierReportParams,
        "Classifier metrics (accuracy, per-class precision/recall) and diagnostic plots.",
    )
