"""Bad data fails at the data stage, with the file, the array, the problem and counts.

Real small files in ``tmp_path`` go through the real data stages (and one through the
CLI); :mod:`dlpipe.datacheck` is also called directly, as a plugin's data stage would.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlpipe import datacheck
from dlpipe.data import DataBundle, split_indices
from dlpipe.errors import DlpipeError
from dlpipe.stages.data import DigitsParams, NpzParams
from dlpipe.stages.data.files import npz
from dlpipe.stages.data.sklearn import sklearn_digits


def make_ctx(seed: int = 0) -> Any:
    return types.SimpleNamespace(seed=seed, data=None, extras={})


def write_npz(folder: Path, name: str = "arrays.npz", **arrays: Any) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


def npz_error(path: Path, **params: Any) -> str:
    """The DlpipeError message of the npz stage on ``path``."""
    with pytest.raises(DlpipeError) as info:
        npz(make_ctx(), NpzParams(path=str(path), **params))
    return str(info.value)


def table(n: int = 40, d: int = 5) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d))


def labels(n: int = 40, k: int = 2) -> np.ndarray:
    return np.arange(n) % k


# ------------------------------------------------------------------ npz stage


def test_nan_features_are_counted_by_value_and_example(tmp_path: Path) -> None:
    x = table()
    x[[4, 9, 20], :4] = np.nan  # 12 NaN values in 3 examples
    path = write_npz(tmp_path, x=x, y=labels())
    assert npz_error(path) == (
        f"{path}: array 'x' has 12 NaN values in 3 of 40 examples "
        "(first: example 4; columns 0, 1, 2, 3); drop or fill them before training"
    )


def test_infinite_features_name_the_array_key_and_both_problems(tmp_path: Path) -> None:
    images = np.ones((30, 6, 6), dtype=np.float32)
    images[7, 0, 0] = np.inf
    images[8, 1, 1] = -np.inf
    images[8, 2, 2] = np.nan
    path = write_npz(tmp_path, images=images, labels=labels(30))
    message = npz_error(path, x_key="images", y_key="labels")
    assert message == (
        f"{path}: array 'images' has 1 NaN value in 1 of 30 examples and 2 infinite values "
        "in 2 of 30 examples (first: example 7); drop or fill them before training"
    )


def test_nan_sample_weights_and_negative_ones(tmp_path: Path) -> None:
    w = np.ones(40)
    w[3] = np.nan
    path = write_npz(tmp_path, x=table(), y=labels(), w=w)
    assert "array 'w' has 1 NaN value in 1 of 40 examples" in npz_error(path, weight_key="w")
    w[3] = -2.0
    path = write_npz(tmp_path, x=table(), y=labels(), w=w)
    assert npz_error(path, weight_key="w") == (
        f"{path}: array 'w' has 1 negative value in 1 of 40 examples, e.g. -2 in example 3; "
        "sample weights must be 0 or more"
    )


def test_text_features_name_dtype_and_an_example_value(tmp_path: Path) -> None:
    x = table(40, 3).astype(str)
    x[5, 1] = "n/a"
    x[6, 1] = ""
    path = write_npz(tmp_path, x=x, y=labels())
    assert npz_error(path) == (
        f"{path}: array 'x' is not numeric (dtype {x.dtype}, text): 2 of 120 values are "
        "not numbers in column 1, e.g. 'n/a' in example 5, column 1; features must be "
        "numbers (encode categories as numbers, or leave those columns out)"
    )


def test_text_that_reads_as_numbers_is_accepted(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=table(40, 3).astype(str), y=labels())
    ctx = make_ctx()
    npz(ctx, NpzParams(path=str(path)))
    assert ctx.data.x["train"].dtype == np.float32


def test_text_labels(tmp_path: Path) -> None:
    y = np.array(["cat", "dog"] * 20)
    path = write_npz(tmp_path, x=table(), y=y)
    message = npz_error(path)
    assert message.startswith(f"{path}: array 'y' is not numeric (dtype <U3, text): ")
    assert message.endswith(
        "40 of 40 values are not numbers, e.g. 'cat' in example 0; labels must be numbers "
        "(map class names to 0..num_classes-1)"
    )


def test_negative_labels(tmp_path: Path) -> None:
    y = labels()
    y[[3, 8]] = -1
    path = write_npz(tmp_path, x=table(), y=y)
    assert npz_error(path) == (
        f"{path}: array 'y' has 2 negative labels in 2 of 40 examples, e.g. -1 in example 3; "
        "class labels count from 0"
    )


def test_non_integer_labels_suggest_regression(tmp_path: Path) -> None:
    y = labels().astype(float)
    y[11] = 0.5
    path = write_npz(tmp_path, x=table(), y=y)
    assert npz_error(path) == (
        f"{path}: array 'y' has 1 non-integer label in 1 of 40 examples, e.g. 0.5 in "
        "example 11; class labels are integers 0..num_classes-1 (for real-valued targets "
        "set task: regression)"
    )


def test_nan_regression_targets(tmp_path: Path) -> None:
    y = np.linspace(0, 1, 40)
    y[[1, 2]] = np.nan
    path = write_npz(tmp_path, x=table(), y=y)
    assert npz_error(path, task="regression") == (
        f"{path}: array 'y' has 2 NaN values in 2 of 40 examples (first: example 1); "
        "drop or fill them before training"
    )


def test_one_hot_labels(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=table(), y=np.eye(2)[labels()])
    assert npz_error(path) == (
        f"{path}: array 'y' has shape (40, 2); class labels are one integer per example, "
        "shape (40,) (one-hot labels: store their argmax)"
    )


def test_lengths_of_x_and_y_differ(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=table(), y=labels(39))
    assert npz_error(path) == (
        f"{path}: array 'x' has 40 examples but array 'y' has 39; "
        "they need one entry per example"
    )


def test_no_examples(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=np.zeros((0, 3)), y=np.zeros(0))
    assert npz_error(path) == f"{path}: array 'x' has no examples"


def test_too_few_examples_to_split(tmp_path: Path) -> None:
    path = write_npz(tmp_path, x=table(2), y=labels(2))
    assert npz_error(path) == (
        f"{path}: 2 examples are too few to split into train/val/test with val_fraction 0.15 "
        "and test_fraction 0.15: the test split takes 1 and the val split takes 1, leaving "
        "none for training. These fractions need at least 3 examples; use more data, or "
        "lower val_fraction or test_fraction (0 turns a split off)"
    )


def test_too_few_examples_after_limit_names_the_larger_fraction_first() -> None:
    with pytest.raises(DlpipeError) as info:
        sklearn_digits(make_ctx(), DigitsParams(limit=10, val_fraction=0.45,
                                                test_fraction=0.5))
    assert str(info.value) == (
        "sklearn_digits: 10 examples are too few to split into train/val/test with "
        "val_fraction 0.45 and test_fraction 0.5: the test split takes 5 and the val split "
        "takes 5, leaving none for training. These fractions need at least 20 examples; "
        "use more data, or lower test_fraction or val_fraction (0 turns a split off)"
    )


def test_a_class_too_small_to_stratify_is_split_without(tmp_path: Path, capsys) -> None:
    y = labels(40)
    y[17] = 2  # class 2 has a single example
    path = write_npz(tmp_path, x=table(), y=y)
    ctx = make_ctx()
    npz(ctx, NpzParams(path=str(path)))
    assert sum(ctx.data.size(s) for s in ("train", "val", "test")) == 40
    assert (
        f"data: {path}: cannot stratify the test split: class 2 has only 1 example "
        "(stratifying needs at least 2 of each class); splitting it without stratification"
    ) in capsys.readouterr().out


def test_fewer_examples_than_classes_in_a_split_is_split_without(tmp_path: Path, capsys) -> None:
    path = write_npz(tmp_path, x=table(12), y=labels(12, k=4))
    ctx = make_ctx()
    npz(ctx, NpzParams(path=str(path), val_fraction=0.0, test_fraction=0.2))
    assert ctx.data.size("test") == 3
    assert (
        f"data: {path}: cannot stratify the test split: the cut would get 3 of 12 examples "
        "for 4 classes (stratifying needs at least one example of each class on each side); "
        "splitting it without stratification"
    ) in capsys.readouterr().out


# ------------------------------------------------------------------ CSV tables (a plugin's loader)


def test_csv_text_column_is_named_by_its_header(tmp_path: Path) -> None:
    csv = tmp_path / "flowers.csv"
    csv.write_text("length,color,width\n1.5,red,0.2\n1.7,2.0,0.3\n1.1,blue,0.1\n")
    header = csv.read_text().splitlines()[0].split(",")
    rows = np.loadtxt(csv, delimiter=",", dtype=str, skiprows=1)
    with pytest.raises(DlpipeError) as info:
        datacheck.check_arrays(csv, rows, columns=header)
    assert str(info.value) == (
        f"{csv}: x is not numeric (dtype <U4, text): 2 of 9 values are not numbers in "
        "column 'color', e.g. 'red' in example 0, column 'color'; features must be numbers "
        "(encode categories as numbers, or leave those columns out)"
    )


def test_csv_nan_cells_name_their_columns(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,c\n1,,3\n4,5,6\n7,8,nan\n")
    rows = np.genfromtxt(csv, delimiter=",", skip_header=1)
    with pytest.raises(DlpipeError) as info:
        datacheck.check_values(csv, "x", rows, columns=["a", "b", "c"])
    assert str(info.value) == (
        f"{csv}: x has 2 NaN values in 2 of 3 examples (first: example 0; columns 'b', 'c'); "
        "drop or fill them before training"
    )


# ------------------------------------------------------------------ the checks directly


def test_labels_outside_the_classes() -> None:
    y = np.array([0, 1, 2, 7, 1, 3])
    with pytest.raises(DlpipeError) as info:
        datacheck.check_arrays("plugin_data", table(6), y, num_classes=3)
    assert str(info.value) == (
        "plugin_data: y has 2 labels outside [0, 3) in 2 of 6 examples, e.g. 7 in example 3; "
        "there are 3 classes, labelled 0..2"
    )


def test_segmentation_masks_are_checked_per_pixel() -> None:
    masks = np.zeros((5, 4, 4), dtype=np.int32)
    masks[2, 1, 1:3] = 9
    with pytest.raises(DlpipeError) as info:
        datacheck.check_labels("masks.npz", "masks", masks, task="segmentation", num_classes=4)
    assert str(info.value) == (
        "masks.npz: masks has 2 labels outside [0, 4) in 1 of 5 examples, e.g. 9 in "
        "example 2; there are 4 classes, labelled 0..3"
    )


def test_other_non_numeric_dtypes_and_scalars() -> None:
    with pytest.raises(DlpipeError, match=r"not numeric \(dtype complex128, complex numbers\)"):
        datacheck.check_values("c.npz", "x", np.ones((3, 2)) + 1j)
    with pytest.raises(DlpipeError, match=r"x is not numeric \(dtype datetime64\[D\], dates\)"):
        datacheck.check_values("d.npz", "x", np.array(["2024-01-01"], dtype="datetime64[D]"))
    with pytest.raises(DlpipeError) as info:
        datacheck.check_values("o.npz", "x", np.array([1, "two", 3.0], dtype=object))
    assert str(info.value).startswith(
        "o.npz: x is not numeric (dtype object, Python objects): 1 of 3 values is not a "
        "number, e.g. 'two' in example 1;"
    )
    with pytest.raises(DlpipeError) as info:
        datacheck.check_values("s.npz", "x", np.float64(5.0))
    assert str(info.value) == "s.npz: x is a single value (5), not an array of examples"


def test_text_sample_weights_and_ragged_examples() -> None:
    with pytest.raises(DlpipeError) as info:
        datacheck.check_arrays("w.npz", table(3), weights=np.array(["1", "heavy", "1"]))
    assert str(info.value) == (
        "w.npz: w is not numeric (dtype <U5, text): 1 of 3 values is not a number, e.g. "
        "'heavy' in example 1; sample weights must be numbers"
    )
    with pytest.raises(DlpipeError) as info:
        datacheck.check_values("plugin_data", "x", [[1.0, 2.0], [3.0]])
    assert str(info.value).startswith(
        "plugin_data: x is not an array of equally shaped examples: "
    )


def test_stratify_problem_messages() -> None:
    assert datacheck.stratify_problem([0, 0, 1, 2, 3, 3], 0.5) == (
        "classes 1, 2 have only 1 example (stratifying needs at least 2 of each class)"
    )
    assert datacheck.stratify_problem([0, 0, 1, 1, 2, 2], 0.8) == (
        "the cut would leave 1 of 6 examples for 3 classes (stratifying needs at least one "
        "example of each class on each side)"
    )
    assert datacheck.stratify_problem([0, 0, 1, 1], 0.5) is None


def test_no_examples_to_split_and_a_plugin_rounding() -> None:
    with pytest.raises(DlpipeError) as info:
        datacheck.check_split("empty", 0, 0.1, 0.1)
    assert str(info.value) == "empty: there are no examples to split"
    with pytest.raises(DlpipeError) as info:
        datacheck.check_split("one", 1, 0.0, 0.2)
    assert str(info.value) == (
        "one: 1 example is too few to split into train/val/test with val_fraction 0 and "
        "test_fraction 0.2: the test split takes 1, leaving none for training. These "
        "fractions need at least 2 examples; use more data, or lower test_fraction "
        "(0 turns a split off)"
    )
    datacheck.check_split("fine", 3, 0.15, 0.15)
    datacheck.check_split("no splits", 1, 0.0, 0.0)

    def round_down(n: int, val: float, test: float) -> dict[str, int]:
        parts = {"val": int(val * n), "test": int(test * n)}
        return {"train": n - parts["val"] - parts["test"], **parts}

    datacheck.check_split("floor", 2, 0.15, 0.15, sizes=round_down)


def test_split_sizes_are_what_the_split_gives() -> None:
    for n, val, test in [(3, 0.15, 0.15), (10, 0.1, 0.3), (17, 0.2, 0.0), (50, 0.0, 0.5),
                         (1797, 0.15, 0.15), (11, 0.45, 0.45)]:
        parts = split_indices(n, None, val, test, seed=0, stratify=False)
        assert {s: len(idx) for s, idx in parts.items()} == datacheck.split_sizes(n, val, test)


def test_stratify_problem_agrees_with_scikit_learn() -> None:
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n, k = int(rng.integers(2, 25)), int(rng.integers(1, 6))
        y = rng.integers(0, k, n)
        fraction = float(rng.choice([0.1, 0.2, 0.3, 0.5, 0.8]))
        if n - math.ceil(fraction * n) < 1:
            continue
        try:
            train_test_split(np.arange(n), test_size=fraction, random_state=0, stratify=y)
            possible = True
        except ValueError:
            possible = False
        assert possible == (datacheck.stratify_problem(y, fraction) is None), (y, fraction)
        checked += 1
    assert checked > 200


def test_sequence_pairs_too_few_to_split() -> None:
    from dlpipe.datasets import sequences as sequence_data

    pairs = sequence_data.reverse_pairs(10, "abcd", 2, 5, seed=0)
    with pytest.raises(DlpipeError) as info:
        sequence_data.split_pairs(pairs, 0.49, 0.49, 0, name="reverse")
    assert str(info.value) == (
        "reverse: 10 examples are too few to split into train/val/test with val_fraction 0.49 "
        "and test_fraction 0.49: the test split takes 5 and the val split takes 5, leaving "
        "none for training. These fractions need at least 11 examples; use more data, or "
        "lower val_fraction or test_fraction (0 turns a split off)"
    )


def test_captions_too_few_to_split() -> None:
    from dlpipe.datasets import captions

    with pytest.raises(DlpipeError, match=r"^captions_digits: 2 examples are too few to split"):
        captions.digits_bundle(limit=2)


# ------------------------------------------------------------------ bundles


def bundle(**changes: Any) -> DataBundle:
    x, y = table(30, 3).astype(np.float32), labels(30, 3).astype(np.int32)
    parts = {"train": slice(0, 20), "val": slice(20, 25), "test": slice(25, 30)}
    fields: dict[str, Any] = dict(
        x={s: x[p] for s, p in parts.items()}, y={s: y[p] for s, p in parts.items()},
        task="classification", num_classes=3, class_names=["a", "b", "c"], name="plugin_data",
    )
    fields.update(changes)
    return DataBundle(**fields)


def test_check_bundle_accepts_a_good_bundle_and_empty_splits() -> None:
    datacheck.check_bundle(bundle())
    good = bundle()
    good.x["test"], good.y["test"] = good.x["test"][:0], good.y["test"][:0]
    datacheck.check_bundle(good)


def test_check_bundle_names_the_split() -> None:
    bad = bundle()
    bad.x["val"][[1, 3], 0] = np.nan
    with pytest.raises(DlpipeError) as info:
        datacheck.check_bundle(bad)
    assert str(info.value) == (
        "plugin_data: val x has 2 NaN values in 2 of 5 examples (first: example 1; column 0); "
        "drop or fill them before training"
    )
    bad = bundle()
    bad.y["test"][2] = 3
    with pytest.raises(DlpipeError) as info:
        datacheck.check_bundle(bad, "my_stage")
    assert str(info.value) == (
        "my_stage: test y has 1 label outside [0, 3) in 1 of 5 examples, e.g. 3 in example 2; "
        "there are 3 classes, labelled 0..2"
    )


def test_check_bundle_empty_train_and_shape_mismatch() -> None:
    empty = bundle()
    empty.x["train"], empty.y["train"] = empty.x["train"][:0], empty.y["train"][:0]
    with pytest.raises(DlpipeError) as info:
        datacheck.check_bundle(empty)
    assert str(info.value) == "plugin_data: the train split is empty (train 0, val 5, test 5)"

    wide = bundle()
    wide.x["val"] = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(DlpipeError) as info:
        datacheck.check_bundle(wide)
    assert str(info.value) == (
        "plugin_data: val x has examples of shape (4,), but train x has (3,)"
    )

    orphans = bundle()
    orphans.x["test"] = orphans.x["test"][:0]
    with pytest.raises(DlpipeError) as info:
        datacheck.check_bundle(orphans)
    assert str(info.value) == "plugin_data: test x has no examples but test y has 5"


def test_datacheck_does_not_import_tensorflow() -> None:
    code = (
        "import sys, dlpipe.datacheck\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


# ------------------------------------------------------------------ the CLI


SPEC = """\
name: bad-data
experiment: tests
seed: 1
tracking: {enabled: false}
stages:
  - {kind: data, use: npz, params: {path: bad.npz}}
  - {kind: model, use: mlp}
  - {kind: train, use: keras_fit, params: {epochs: 1, verbose: 0}}
"""


def test_cli_run_stops_at_bad_data_without_training(workdir: Path, capsys, monkeypatch) -> None:
    from dlpipe.cli import main
    from dlpipe.stages.train import fit as train

    calls: list[str] = []
    monkeypatch.setattr(train, "keras_fit", lambda ctx, params: calls.append("trained"))
    x = table()
    x[[4, 9, 20], :4] = np.nan
    np.savez(workdir / "bad.npz", x=x, y=labels())
    (workdir / "spec.yaml").write_text(SPEC)

    assert main(["run", "spec.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "error: bad.npz: array 'x' has 12 NaN values in 3 of 40 examples (first: example 4; "
        "columns 0, 1, 2, 3); drop or fill them before training"
    )
    assert "Traceback" not in captured.err + captured.out
    assert calls == []
    assert "data: " not in captured.out  # the stage never reported a finished data set
