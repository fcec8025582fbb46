"""The built-in data stages and the keras_layers augment stage (CPU, small data)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError
from dlpipe.stages.augment import KerasAugmentParams
from dlpipe.stages.augment import stage as augment_stages
from dlpipe.stages.data import (
    DigitsParams,
    ImageDirectoryParams,
    IrisParams,
    KerasDatasetParams,
    NpzParams,
)
from dlpipe.stages.data.files import image_directory, npz
from dlpipe.stages.data.keras_datasets import keras_dataset
from dlpipe.stages.data.sklearn import sklearn_digits, sklearn_iris


def make_ctx(seed: int = 0) -> Any:
    return types.SimpleNamespace(seed=seed, data=None, extras={})


def digits(ctx: Any | None = None, **params: Any) -> DataBundle:
    ctx = ctx or make_ctx()
    sklearn_digits(ctx, DigitsParams(**params))
    return ctx.data


def test_digits_split_sizes_add_up_and_are_stratified(capsys) -> None:
    ctx = make_ctx()
    data = digits(ctx)
    sizes = {s: data.size(s) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert data.input_shape == (8, 8, 1)
    assert data.x["train"].dtype == np.float32 and data.y["train"].dtype == np.int32
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert ctx.extras["data"]["train_size"] == 1257
    assert "1257/270/270 train/val/test" in capsys.readouterr().out

    overall = np.bincount(np.concatenate(list(data.y.values())), minlength=10) / 1797
    for split in ("train", "val", "test"):
        share = np.bincount(data.y[split], minlength=10) / data.size(split)
        assert np.abs(share - overall).max() < 0.01


def test_splits_are_reproducible_and_depend_on_the_seed() -> None:
    first, again = digits(), digits()
    other_ctx_seed = digits(make_ctx(seed=1))
    other_param_seed = digits(seed=7)
    np.testing.assert_array_equal(first.x["val"], again.x["val"])
    np.testing.assert_array_equal(first.y["test"], again.y["test"])
    assert not np.array_equal(first.x["val"], other_ctx_seed.x["val"])
    assert not np.array_equal(first.x["val"], other_param_seed.x["val"])


def test_zero_fractions_give_empty_splits_and_limit_keeps_first_examples() -> None:
    data = digits(val_fraction=0.0, test_fraction=0.0, limit=100)
    assert data.size("train") == 100
    assert data.x["val"].shape == (0, 8, 8, 1) and data.y["test"].shape == (0,)
    ds = data.dataset("train", 32)
    assert sum(int(x.shape[0]) for x, _ in ds) == 100


def test_minmax_to_symmetric_range_uses_training_statistics() -> None:
    data = digits(value_range=(-1.0, 1.0))
    assert data.x["train"].min() == pytest.approx(-1.0)
    assert data.x["train"].max() == pytest.approx(1.0)
    assert data.value_range == (-1.0, 1.0)


def test_standard_normalization_is_fitted_on_train() -> None:
    data = digits(normalize="standard")
    assert data.x["train"].mean() == pytest.approx(0.0, abs=1e-4)
    assert data.x["train"].std() == pytest.approx(1.0, abs=1e-3)
    assert data.value_range == (
        pytest.approx(float(data.x["train"].min())),
        pytest.approx(float(data.x["train"].max())),
    )


def test_image_size_resizes() -> None:
    data = digits(image_size=(16, 16), limit=200)
    assert data.input_shape == (16, 16, 1)
    assert data.x["train"].min() == pytest.approx(0.0)
    assert data.x["train"].max() == pytest.approx(1.0)


def test_iris_is_a_standardized_table() -> None:
    ctx = make_ctx()
    sklearn_iris(ctx, IrisParams())
    data = ctx.data
    assert data.input_shape == (4,) and not data.is_image
    assert data.num_classes == 3 and data.class_names == ["setosa", "versicolor", "virginica"]
    assert sum(data.size(s) for s in ("train", "val", "test")) == 150
    np.testing.assert_allclose(data.x["train"].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x["train"].std(axis=0), 1.0, atol=1e-4)


def test_npz_roundtrip(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(60, 10, 12)).astype(np.uint8)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "arrays.npz", images=x, labels=y)
    monkeypatch.chdir(tmp_path)  # the path is relative to the working directory
    ctx = make_ctx()
    params = NpzParams(path="arrays.npz", x_key="images", y_key="labels", normalize="none")
    npz(ctx, params)
    data = ctx.data
    assert data.input_shape == (10, 12, 1) and data.num_classes == 3
    assert data.name == "arrays"
    joined = np.concatenate([data.x[s] for s in ("train", "val", "test")])
    assert sorted(joined.ravel().tolist()) == sorted(x.astype(np.float32).ravel().tolist())


def test_npz_tabular_regression(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(40, 3))
    np.savez(tmp_path / "table.npz", x=x, y=x.sum(axis=1))
    ctx = make_ctx()
    npz(ctx, NpzParams(path=str(tmp_path / "table.npz"), task="regression"))
    assert ctx.data.input_shape == (3,) and ctx.data.num_classes is None
    assert ctx.data.y["train"].dtype == np.float32


def test_npz_missing_file_names_it_and_a_close_match(tmp_path: Path) -> None:
    np.savez(tmp_path / "digits.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(DlpipeError) as info:
        npz(make_ctx(), NpzParams(path=str(tmp_path / "digit.npz")))
    message = str(info.value)
    assert "digit.npz" in message and "not found" in message
    assert "did you mean" in message and "digits.npz" in message


def test_npz_missing_key_names_key_file_and_available_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 2)), labels=np.zeros(4))
    with pytest.raises(DlpipeError) as info:
        params = NpzParams(path=str(tmp_path / "d.npz"), x_key="image", y_key="labels")
        npz(make_ctx(), params)
    message = str(info.value)
    assert "d.npz" in message and "'image'" in message
    assert "images, labels" in message and "did you mean: images?" in message


def write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, size=(10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def test_image_directory(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets")
    ctx = make_ctx()
    params = ImageDirectoryParams(
        path=str(tmp_path / "pets"), image_size=(8, 6), val_fraction=0.0, test_fraction=0.0
    )
    image_directory(ctx, params)
    data = ctx.data
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.input_shape == (8, 6, 3) and data.size("train") == 6
    assert sorted(data.y["train"].tolist()) == [0, 0, 0, 1, 1, 1]

    image_directory(ctx, params.model_copy(update={"color_mode": "grayscale"}))
    assert ctx.data.input_shape == (8, 6, 1)


def test_image_directory_errors_explain_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match=r"not found.*<class>/<image>\.png"):
        image_directory(make_ctx(), ImageDirectoryParams(path=str(tmp_path / "no")))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DlpipeError, match=r"no images found.*<class>/<image>\.png"):
        image_directory(make_ctx(), ImageDirectoryParams(path=str(tmp_path / "empty")))


def test_keras_dataset_offline_error(monkeypatch) -> None:
    import urllib.error

    import keras

    def offline() -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DlpipeError) as info:
        keras_dataset(make_ctx(), KerasDatasetParams(dataset="mnist"))
    message = str(info.value)
    assert "'mnist'" in message and "network" in message
    assert "~/.keras/datasets" in message and "sklearn_digits" in message


def test_augment_needs_data_and_images() -> None:
    with pytest.raises(DlpipeError, match="needs a data stage before it"):
        augment_stages.keras_layers(make_ctx(), KerasAugmentParams(noise=0.1))
    ctx = make_ctx()
    sklearn_iris(ctx, IrisParams())
    with pytest.raises(DlpipeError, match="images"):
        augment_stages.keras_layers(ctx, KerasAugmentParams(noise=0.1))


def test_augment_bad_flip_mode_suggests_one() -> None:
    ctx = make_ctx()
    ctx.data = digits(limit=100)
    with pytest.raises(DlpipeError, match="did you mean: horizontal"):
        augment_stages.keras_layers(ctx, KerasAugmentParams(flip="horizonal"))


def test_augment_changes_only_augmented_training_batches(capsys) -> None:
    ctx = make_ctx()
    data = digits(ctx, limit=200)
    params = KerasAugmentParams(flip="horizontal", rotation=0.05, zoom=0.1, translation=0.1,
                                contrast=0.2, noise=0.5)
    augment_stages.keras_layers(ctx, params)
    assert len(data.augmenters) == 6
    assert "GaussianNoise(0.5)" in capsys.readouterr().out

    plain = next(iter(data.dataset("train", 8)))[0].numpy()
    augmented, labels = next(iter(data.dataset("train", 8, augment=True)))
    np.testing.assert_array_equal(plain, data.x["train"][:8])
    assert augmented.shape == plain.shape
    assert not np.allclose(augmented.numpy(), plain)
    np.testing.assert_array_equal(labels.numpy(), data.y["train"][:8])
    # Without augment=True (as for validation and test) batches are the plain arrays.
    val = next(iter(data.dataset("val", 8)))[0].numpy()
    np.testing.assert_array_equal(val, data.x["val"][:8])
