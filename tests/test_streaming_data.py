"""Data larger than memory: StreamingBundle, image_directory's streaming, the tfrecord
stage and `dlpipe convert` (CPU, a few dozen generated PNGs)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlpipe.data import StreamingBundle
from dlpipe.errors import DlpipeError
from dlpipe.stages.data import ImageDirectoryParams, TfrecordParams
from dlpipe.stages.data import streaming as streaming_module
from dlpipe.stages.data.files import image_directory
from dlpipe.stages.data.streaming import FileListSource, GeneratorSource
from dlpipe.stages.data.tfrecord import tfrecord

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 12


def make_ctx(seed: int = 0) -> Any:
    return types.SimpleNamespace(seed=seed, data=None, extras={})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 12 PNGs of two sizes (so resizing is exercised), random pixels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "pets"
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(PER_CLASS):
            size = (10, 14, 3) if i % 3 else (12, 12, 3)
            pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
    return root


def load(folder: Path, seed: int = 0, **params: Any) -> Any:
    ctx = make_ctx(seed)
    image_directory(ctx, ImageDirectoryParams(path=str(folder), image_size=(8, 8), **params))
    return ctx.data


def batches(ds: Any) -> list[tuple[np.ndarray, ...]]:
    return list(ds.as_numpy_iterator())


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ya, yb)


def test_a_streamed_folder_gives_the_in_memory_batches_and_training(folder):
    import keras

    memory = load(folder, seed=3)
    streamed = load(folder, seed=3, stream=True)
    assert isinstance(streamed, StreamingBundle) and not isinstance(memory, StreamingBundle)
    assert streamed.input_shape == memory.input_shape
    assert streamed.class_names == memory.class_names and streamed.value_range == memory.value_range
    for split in ("train", "val", "test"):
        assert streamed.size(split) == memory.size(split)
        np.testing.assert_allclose(streamed.x[split], memory.x[split], atol=1e-5)
        np.testing.assert_array_equal(streamed.y[split], memory.y[split])

    # The epochs of a resumed run (first_epoch=1), and unshuffled evaluation batches.
    kwargs = {"first_epoch": 1, "epochs": 3, "seed": 9}
    assert_same_batches(batches(memory.epoch_dataset("train", 5, **kwargs)),
                        batches(streamed.epoch_dataset("train", 5, **kwargs)))
    assert_same_batches(batches(memory.dataset("val", 4)), batches(streamed.dataset("val", 4)))

    def fitted(data: Any) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)  # the same initial weights for both
        model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        steps = -(-data.size("train") // 8)
        model.fit(data.epoch_dataset("train", 8, epochs=2, seed=1), epochs=2,
                  steps_per_epoch=steps, verbose=0, shuffle=False)
        return model.get_weights()

    for wa, wb in zip(fitted(memory), fitted(streamed), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


def test_streamed_grayscale_equals_pil_grayscale(folder):
    memory = load(folder, color_mode="grayscale", val_fraction=0.0, test_fraction=0.0)
    streamed = load(folder, color_mode="grayscale", val_fraction=0.0, test_fraction=0.0,
                    stream=True)
    assert streamed.input_shape == (8, 8, 1)
    np.testing.assert_allclose(streamed.x["train"], memory.x["train"], atol=1e-5)


def test_augmentation_runs_inside_the_streamed_pipeline(folder):
    from dlpipe.stages.augment import KerasAugmentParams
    from dlpipe.stages.augment.stage import keras_layers

    ctx = make_ctx()
    ctx.data = data = load(folder, stream=True)
    keras_layers(ctx, KerasAugmentParams(flip="horizontal", noise=0.3))
    assert len(data.augmenters) == 2
    plain = next(iter(data.dataset("train", 8)))
    augmented = next(iter(data.dataset("train", 8, augment=True)))
    np.testing.assert_allclose(plain[0].numpy(), data.x["train"][:8], atol=1e-6)
    assert not np.allclose(augmented[0].numpy(), plain[0].numpy())
    np.testing.assert_array_equal(augmented[1].numpy(), plain[1].numpy())


def test_splits_are_seeded_stratified_and_cut_without_decoding(folder, monkeypatch):
    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an image was read")

    # With the size and the value range given, nothing but the file names is read.
    monkeypatch.setattr(streaming_module, "decode_image", no_decoding)
    monkeypatch.setattr(streaming_module, "image_size_of", no_decoding)
    given = {"stream": True, "input_range": (0.0, 255.0)}

    def files(data: Any) -> dict[str, list[str]]:
        return {s: data.sources[s].paths for s in ("train", "val", "test")}

    first, again, other = (load(folder, seed=s, **given) for s in (5, 5, 6))
    assert files(first) == files(again) and files(first) != files(other)
    parts = files(first)
    everything = [p for split in parts.values() for p in split]
    assert len(everything) == len(set(everything)) == len(CLASSES) * PER_CLASS
    for split in ("val", "test"):  # stratified: every class in every split
        assert sorted(np.bincount(first.sources[split].labels).tolist()) == [2, 2, 2]
    assert first.preprocessing["low"] == 0.0 and first.preprocessing["high"] == 255.0


def test_stream_auto_switches_on_the_decoded_size(folder, capsys):
    assert not isinstance(load(folder), StreamingBundle)
    small_cap = load(folder, max_in_memory_mb=0.001)
    assert isinstance(small_cap, StreamingBundle)
    assert "more than max_in_memory_mb" in capsys.readouterr().out


def test_shards_are_disjoint_and_cover_each_split(folder):
    data = load(folder, stream=True)
    shards = [data.shard(3, i) for i in range(3)]
    for split in ("train", "val", "test"):
        paths = [p for shard in shards for p in shard.sources[split].paths]
        assert sorted(paths) == sorted(data.sources[split].paths)
        assert len(set(paths)) == len(paths)
        assert sum(shard.size(split) for shard in shards) == data.size(split)
    ds = shards[1].epoch_dataset("train", 4)
    policy = ds.options().experimental_distribute.auto_shard_policy
    assert policy.name == "OFF"
    with pytest.raises(DlpipeError, match="0 <= index < count"):
        data.shard(2, 2)

    def numbers():
        for i in range(10):
            yield np.full((2,), i, np.float32), np.int32(i % 2)

    source = GeneratorSource(numbers, 10, (2,))
    seen = [sorted(int(x[0]) for x, _ in source.shard(2, k).read().as_numpy_iterator())
            for k in range(2)]
    assert seen == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    order = np.array([7, 1], np.int64)
    one = [int(x[0]) for x, _ in source.read(order).as_numpy_iterator()]
    assert one == [int(x[0]) for x, _ in source.read(order).as_numpy_iterator()]
    assert sorted(one) == list(range(10))


def test_normalization_statistics_come_from_a_bounded_pass(folder, monkeypatch):
    counted = []
    measure = streaming_module.stream_statistics

    def counting(batches: Any) -> dict[str, float]:
        stats = measure(batches)
        counted.append(stats["count"])
        return stats

    monkeypatch.setattr(streaming_module, "stream_statistics", counting)
    data = load(folder, stream=True, normalize="standard", stats_sample=5)
    assert counted == [5 * 8 * 8 * 3]  # 5 images, not the 24 of the training split
    prep = data.preprocessing
    assert prep["method"] == "standard" and prep["std"] > 0
    source: FileListSource = data.sources["train"]
    raw = np.concatenate([b[0] for b in batches(source.read().batch(64))])
    np.testing.assert_allclose(data.x["train"], (raw - prep["mean"]) / prep["std"], atol=1e-4)

    # Statistics given in the spec: no pass at all; the in-memory form uses them too.
    given = {"normalize": "standard", "mean": 100.0, "std": 50.0, "input_range": (0.0, 255.0)}
    streamed = load(folder, stream=True, **given)
    assert counted == [5 * 8 * 8 * 3]
    memory = load(folder, **given)
    np.testing.assert_allclose(streamed.x["test"], memory.x["test"], atol=1e-5)
    assert streamed.value_range == pytest.approx((-2.0, 3.1))


def test_streamed_splits_refuse_in_memory_arrays(folder):
    data = load(folder, stream=True)
    with pytest.raises(DlpipeError, match="set stream: false"):
        dataclasses.replace(data, x={**data.x})


def test_convert_round_trips_to_the_tfrecord_stage(folder, tmp_path, capsys):
    from dlpipe.cli import main

    assert main(["convert", str(folder), str(tmp_path / "enc"), "--shards", "6"]) == 0
    out = capsys.readouterr().out
    assert "convert: wrote 36 examples in 6 shards" in out
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["class_names"] == list(CLASSES) and manifest["image_format"] == "encoded"
    assert sum(s["count"] for s in manifest["shards"]) == 36

    def examples(data: Any, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([data.x[s].reshape(data.size(s), -1) for s in splits]),
                np.concatenate([data.y[s] for s in splits]))

    def assert_same_examples(a: Any, b: Any, splits: tuple[str, ...] = ("train", "val", "test"),
                             atol: float = 1e-4) -> None:
        """The same (image, label) pairs in ``splits``, in any order."""
        (xa, ya), (xb, yb) = examples(a, splits), examples(b, splits)
        assert len(xa) == len(xb)
        for image, label in zip(xa, ya, strict=True):
            distance = np.abs(xb - image).max(axis=1)
            assert distance.min() < atol and yb[distance.argmin()] == label

    ctx = make_ctx()
    tfrecord(ctx, TfrecordParams(files=str(tmp_path / "enc" / "*.tfrecord"), image_size=(8, 8),
                                 input_range=(0, 255)))
    records = ctx.data
    assert records.class_names == list(CLASSES) and records.input_shape == (8, 8, 3)
    sizes = [records.size(s) for s in ("train", "val", "test")]
    assert sum(sizes) == 36 and all(n % 6 == 0 and n > 0 for n in sizes)  # whole files
    assert_same_examples(records, load(folder, input_range=(0, 255)))
    batch = next(iter(records.epoch_dataset("train", 4, epochs=1)))
    assert batch[0].shape == (4, 8, 8, 3)

    # Raw pixels, resized while converting, with the splits written as separate shards.
    assert main(["convert", str(folder), str(tmp_path / "raw"), "--image-size", "8", "8",
                 "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    tfrecord(ctx, TfrecordParams(files=str(tmp_path / "raw" / "*.tfrecord"), normalize="none"))
    assert [ctx.data.size(s) for s in ("train", "val", "test")] == [21, 7, 8]
    memory = load(folder, val_fraction=0.2, test_fraction=0.2, normalize="none")
    for split in ("train", "val", "test"):  # the same cut; pixels rounded to 8 bits
        assert_same_examples(ctx.data, memory, (split,), atol=0.5001)

    # An .npz of 8-bit images, read back without a manifest (records are counted).
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(20, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    assert main(["convert", str(tmp_path / "d.npz"), str(tmp_path / "npz"), "--shards", "4"]) == 0
    (tmp_path / "npz" / "manifest.json").unlink()
    tfrecord(ctx, TfrecordParams(
        files=str(tmp_path / "npz" / "*.tfrecord"), val_fraction=0.0, test_fraction=0.0,
        features={"format": "raw", "shape": (6, 6, 1)}, normalize="none"))
    assert ctx.data.class_names == ["0", "1"] and ctx.data.size("train") == 20
    assert sorted(ctx.data.x["train"].ravel().tolist()) == sorted(x.ravel().astype(float).tolist())
    assert main(["convert", str(tmp_path / "d.npz"), str(tmp_path / "npz")]) != 0  # not empty


def test_classifier_report_and_evaluate_on_a_streamed_bundle(folder, tmp_path, capsys):
    import keras

    from dlpipe.stages.evaluate import KerasEvaluateParams
    from dlpipe.stages.evaluate.stage import keras_evaluate
    from dlpipe.stages.reports import ClassifierReportParams
    from dlpipe.stages.reports.classifier import classifier_report

    data = load(folder, stream=True, max_report_examples=3, test_fraction=0.3)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.dataset("train", 8), epochs=1, verbose=0, shuffle=False)

    class Context:
        history: dict[str, list[float]] = {}
        stage = types.SimpleNamespace(id="evaluate")

        def __init__(self) -> None:
            self.model, self.data, self.metrics, self.files = model, data, {}, []

        def model_entry(self) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
            self.metrics.update(metrics)

        def log_figure(self, figure: Any, filename: str, artifact_path: str = "plots") -> None:
            figure.savefig(tmp_path / filename, dpi=40)
            self.files.append(filename)

    ctx = Context()
    classifier_report(ctx, ClassifierReportParams(worst=4))
    keras_evaluate(ctx, KerasEvaluateParams())
    out = capsys.readouterr().out
    assert f"first 3 of {data.size('test')} test examples" in out
    assert f"classifier_report (test, {data.size('test')} examples)" in out

    # The metrics cover the whole test split, not the 3 examples reports keep in memory.
    x, y = (np.concatenate(part) for part in zip(*batches(data.dataset("test", 64)), strict=True))
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    assert len(data.x["test"]) == 3 and len(y) == data.size("test") > 3
    assert ctx.metrics["test_accuracy"] == pytest.approx(np.mean(predicted == y))
    assert {"confusion_matrix.png", "misclassified.png"} <= set(ctx.files)

    # Sample grids read the same bounded examples.
    from dlpipe.models import grids

    assert grids.first_split(data) == "test" and len(grids.labels_of(data, "test")) == 3
    figure = grids.grid_figure(data.x["test"], grids.value_range_of(data), cols=3)
    assert figure.axes
