"""Built-in data stages: embedded scikit-learn data, local files, keras.datasets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params


class SplitParams(Params):
    """Shared by every data stage: seeded splits and normalization."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of data for validation.")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of data for testing.")
    seed: int | None = Field(None, description="Split seed. Default: the pipeline's seed.")
    stratify: bool = Field(True, description="Keep class proportions in every split.")
    normalize: Literal["none", "minmax", "standard"] = Field(
        "minmax",
        description="minmax scales to value_range using the training split's range; "
        "standard uses the training split's mean and std.",
    )
    value_range: tuple[float, float] = Field(
        (0.0, 1.0), description="Target range for minmax, e.g. [0, 1] or [-1, 1]."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N examples.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


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


class ImageDirectoryParams(ImageParams):
    path: str = Field(description="A folder with one sub-folder of images per class.")
    image_size: tuple[int, int] | None = Field((64, 64), description="Resize to [h, w].")
    color_mode: Literal["grayscale", "rgb"] = "rgb"


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


_IMPL = "dlpipe.stages.data"


@hookimpl
def register_stages(register):
    register("data", "sklearn_digits", f"{_IMPL}:sklearn_digits", DigitsParams,
             "Embedded 8x8 handwritten digits from scikit-learn (no network).")
    register("data", "sklearn_iris", f"{_IMPL}:sklearn_iris", IrisParams,
             "Embedded iris table from scikit-learn (no network).")
    register("data", "npz", f"{_IMPL}:npz", NpzParams, "Arrays from a local .npz file.")
    register("data", "image_directory", f"{_IMPL}:image_directory", ImageDirectoryParams,
             "A folder of class sub-folders of images.")
    register("data", "keras_dataset", f"{_IMPL}:keras_dataset", KerasDatasetParams,
             "mnist, fashion_mnist or cifar10 via keras.datasets (network or cache).")
    register("data", "xor", f"{_IMPL}:xor", XorParams,
             "The XOR problem: four corners (optionally noisy) or a noisy cloud.")
