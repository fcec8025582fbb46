"""Built-in data stages: embedded scikit-learn data, local files (arrays, CSV tables,
folders of images or text, TFRecord shards), keras.datasets, the XOR problem.

This module declares the parameters and registers ``"module:function"`` strings; the
stage functions are in the package's modules, so importing it loads neither Keras nor
TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class FractionParams(Params):
    """Shared by every data stage: the seeded train/val/test split."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of data for validation.")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of data for testing.")
    seed: int | None = Field(None, description="Split seed. Default: the pipeline's seed.")
    stratify: bool = Field(True, description="Keep class proportions in every split.")

    @model_validator(mode="after")
    def _fractions(self) -> FractionParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class SplitParams(FractionParams):
    """Shared by the data stages of numeric arrays: split, normalization, limit."""

    normalize: Literal["none", "minmax", "standard"] = Field(
        "minmax",
        description="minmax scales to value_range using the training split's range; "
        "standard uses the training split's mean and std.",
    )
    value_range: tuple[float, float] = Field(
        (0.0, 1.0), description="Target range for minmax, e.g. [0, 1] or [-1, 1]."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N examples.")


class ImageParams(SplitParams):
    image_size: tuple[int, int] | None = Field(
        None, description="Resize images to [height, width] (e.g. [16, 16])."
    )


class DigitsParams(ImageParams):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""


class IrisParams(SplitParams):
    """scikit-learn's bundled iris table (150 rows, 4 features, 3 classes)."""

    normalize: Literal["none", "minmax", "standard"] = "standard"


class NpzParams(ImageParams):
    path: str = Field(description="A .npz file.")
    x_key: str = Field("x", description="Array name of the features.")
    y_key: str | None = Field("y", description="Array name of the labels (null: none).")
    task: Literal["classification", "regression", "unsupervised"] = "classification"
    weight_key: str | None = Field(
        None, description="Array name of per-example loss weights (null: none)."
    )


class StreamingParams(Params):
    """Shared by the data stages that can leave images on disk (streamed): how they are
    normalized without reading them all, and how many of them reports hold."""

    stats_sample: int = Field(
        512, ge=1,
        description="Streamed data: normalization statistics (the training split's range, "
        "mean and std) come from this many training images, drawn with the seed, unless "
        "mean/std and input_range give them.",
    )
    mean: float | None = Field(
        None, description="Streamed data: the mean pixel value for normalize: standard "
        "(give std with it); skips measuring it.",
    )
    std: float | None = Field(
        None, gt=0, description="Streamed data: the pixel std for normalize: standard.",
    )
    input_range: tuple[float, float] | None = Field(
        None, description="The raw values' range, e.g. [0, 255]: minmax scales it to "
        "value_range without measuring the data (in memory too).",
    )
    max_report_examples: int = Field(
        1000, ge=1,
        description="Streamed data: reports, figures and sample grids read the first N "
        "examples of a split into memory; metrics use the whole split.",
    )

    @model_validator(mode="after")
    def _statistics(self) -> StreamingParams:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together")
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError("input_range must be [low, high] with low < high")
        return self


class ImageDirectoryParams(ImageParams, StreamingParams):
    path: str = Field(description="A folder with one sub-folder of images per class.")
    image_size: tuple[int, int] | None = Field((64, 64), description="Resize to [h, w].")
    color_mode: Literal["grayscale", "rgb"] = "rgb"
    stream: Literal["auto"] | bool = Field(
        "auto",
        description="true: decode images from the files as batches are made (data larger "
        "than memory); false: decode all of them into memory first; auto: stream when the "
        "decoded images would take more than max_in_memory_mb.",
    )
    max_in_memory_mb: float = Field(
        2048, gt=0,
        description="stream: auto streams above this size of the decoded float32 images.",
    )


class TfrecordFeatures(Params):
    """How images and labels are stored in each tf.train.Example record."""

    image: str = Field("image", description="Feature (bytes) holding the image.")
    label: str | None = Field("label", description="Int64 feature holding the class (null: none).")
    format: Literal["encoded", "raw"] = Field(
        "encoded",
        description="encoded: PNG/JPEG/BMP/GIF bytes; raw: pixel bytes of dtype in shape.",
    )
    shape: tuple[int, int, int] | None = Field(
        None, description="raw: the stored [height, width, channels]."
    )
    dtype: Literal["uint8", "float32"] = Field("uint8", description="raw: the pixel type.")

    @model_validator(mode="after")
    def _raw_shape(self) -> TfrecordFeatures:
        if self.format == "raw" and self.shape is None:
            raise ValueError("format: raw needs the stored shape [height, width, channels]")
        return self


class TfrecordParams(FractionParams, StreamingParams):
    """Sharded TFRecord files of images, streamed (``dlpipe convert`` writes them)."""

    files: str | list[str] | None = Field(
        None,
        description="Glob(s) of the TFRecord files, e.g. data/pets/*.tfrecord. A relative "
        "pattern is looked up in the working directory, then next to the spec file.",
    )
    splits: dict[Literal["train", "val", "test"], str | list[str]] | None = Field(
        None,
        description="Files of each split, as globs ({train: ..., val: ..., test: ...}). "
        "Default: the splits dlpipe convert recorded, else whole files cut by val_fraction "
        "and test_fraction with the seed.",
    )
    features: TfrecordFeatures | None = Field(
        None, description="The record layout. Default: from the manifest.json that dlpipe "
        "convert writes next to the files, else encoded images under image/label.",
    )
    class_names: list[str] | None = Field(
        None, description="Class names by label. Default: the manifest's, else 0..N-1."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="Resize to [h, w]. Default: the size of the first image."
    )
    color_mode: Literal["grayscale", "rgb"] | None = Field(
        None, description="Encoded images: rgb or grayscale. Default: the manifest's, else rgb."
    )
    normalize: Literal["none", "minmax", "standard"] = Field(
        "minmax",
        description="minmax scales to value_range with the training split's range; standard "
        "uses its mean and std (measured on stats_sample images unless given).",
    )
    value_range: tuple[float, float] = Field(
        (0.0, 1.0), description="Target range for minmax, e.g. [0, 1] or [-1, 1]."
    )
    shuffle_buffer: int = Field(
        2048, ge=1,
        description="Training records are shuffled in windows of this many (after the "
        "per-epoch file order); memory grows with it, not with the data.",
    )

    @model_validator(mode="after")
    def _files(self) -> TfrecordParams:
        if (self.files is None) == (self.splits is None):
            raise ValueError("give files (a glob) or splits ({train: glob, ...}), not both")
        if self.splits is not None and "train" not in self.splits:
            raise ValueError("splits needs a train entry")
        return self


class KerasDatasetParams(ImageParams):
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"


class XorParams(SplitParams):
    """The XOR problem: two inputs, label 1 when exactly one is on (generated)."""

    layout: Literal["corners", "cloud"] = Field(
        "corners",
        description="corners: the four points (0,0) (0,1) (1,0) (1,1), repeated; cloud: "
        "uniform points in [-1, 1]^2 labelled by the signs of the coordinates.",
    )
    repeats: int = Field(64, ge=1, description="Copies of each corner (cloud: 4 * repeats points).")
    noise: float = Field(0.0, ge=0.0, description="Std of Gaussian noise added to the inputs.")
    normalize: Literal["none", "minmax", "standard"] = "none"


class CsvParams(SplitParams):
    """A CSV table with a header row: one example per row, one column holds the label."""

    path: str = Field(
        description="The .csv file. A relative path is looked up in the working directory, "
        "then next to the spec file."
    )
    label: str = Field(description="The column with the class or target of each row.")
    features: list[str] | None = Field(
        None, min_length=1,
        description="Feature columns, in this order. Default: every column but the label.",
    )
    categorical: list[str] = Field(
        default_factory=list,
        description="Feature columns of categories (text), one-hot encoded with the categories "
        "of the training split; a category not seen there, or an empty cell, encodes as all "
        "zeros. The other feature columns must hold numbers; empty cells there are missing "
        "values, which stop the stage.",
    )
    task: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: the label column holds class names (text or whole "
        "numbers); regression: numbers.",
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator.")
    normalize: Literal["none", "minmax", "standard"] = Field(
        "standard",
        description="Scaling of the numeric columns with the training split's statistics "
        "(one-hot columns stay 0/1): standard (mean 0, std 1), minmax (to value_range) "
        "or none.",
    )

    @model_validator(mode="after")
    def _columns(self) -> CsvParams:
        for name, columns in (("features", self.features or []), ("categorical", self.categorical)):
            if self.label in columns:
                raise ValueError(f"the label column {self.label!r} cannot also be in {name}")
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:
                raise ValueError(f"{name} lists {', '.join(map(repr, twice))} more than once")
        if self.features is not None:
            missing = [c for c in self.categorical if c not in self.features]
            if missing:
                raise ValueError(
                    f"categorical column(s) {', '.join(map(repr, missing))} are not in "
                    "features; add them there, or leave features out to use every column"
                )
        return self


class TextDirectoryParams(FractionParams):
    """A folder with one sub-folder of .txt files per class (path/<class>/<name>.txt)."""

    path: str = Field(
        description="The folder. A relative path is looked up in the working directory, "
        "then next to the spec file."
    )
    encoding: str = Field("utf-8", description="Text encoding of the files.")
    lowercase: bool = Field(False, description="Lower-case every text.")
    max_chars: int | None = Field(
        None, ge=1, description="Cut each text to its first N characters (after whitespace "
        "is collapsed to single spaces). Default: keep it whole."
    )


@hookimpl
def register_stages(register):
    register("data", "sklearn_digits", "dlpipe.stages.data.sklearn:sklearn_digits", DigitsParams,
             "Embedded 8x8 handwritten digits from scikit-learn (no network).")
    register("data", "sklearn_iris", "dlpipe.stages.data.sklearn:sklearn_iris", IrisParams,
             "Embedded iris table from scikit-learn (no network).")
    register("data", "npz", "dlpipe.stages.data.files:npz", NpzParams, "Arrays from a local .npz file.")
    register("data", "image_directory", "dlpipe.stages.data.files:image_directory", ImageDirectoryParams,
             "A folder of class sub-folders of images (streamed from the files when large).")
    register("data", "tfrecord", "dlpipe.stages.data.tfrecord:tfrecord", TfrecordParams,
             "Sharded TFRecord files of images (dlpipe convert writes them), streamed.")
    register("data", "keras_dataset", "dlpipe.stages.data.keras_datasets:keras_dataset", KerasDatasetParams,
             "mnist, fashion_mnist or cifar10 via keras.datasets (network or cache).")
    register("data", "xor", "dlpipe.stages.data.xor:xor", XorParams,
             "The XOR problem: four corners (optionally noisy) or a noisy cloud.")
    register("data", "csv", "dlpipe.stages.data.tables:csv_table", CsvParams,
             "A CSV table: numeric columns standardized, categorical columns one-hot encoded; "
             "classification or regression.")
    register("data", "text_directory", "dlpipe.stages.data.texts:text_directory", TextDirectoryParams,
             "A folder of class sub-folders of .txt files (text classification, character "
             "tokens; a tokenize stage may re-tokenize them).")
