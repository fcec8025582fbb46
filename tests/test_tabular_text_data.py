"""The csv and text_directory data stages, the tokenizer on their texts, and the two
example pipelines (pipelines/csv_wine.yaml, pipelines/text_topics.yaml).

The stage tests write tiny files to tmp_path and need no TensorFlow; the pipeline tests
"run" each pipeline for a few epochs and use what it logged to encode raw inputs again.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from dlpipe.data import split_indices
from dlpipe.datasets.bundles import TextClassBundle
from dlpipe.datasets.vocab import Vocabulary, encode_texts
from dlpipe.errors import DlpipeError
from dlpipe.stages.data import CsvParams, TextDirectoryParams
from dlpipe.stages.data.tables import TablePreprocessing, csv_table, read_csv
from dlpipe.stages.data.texts import text_directory
from dlpipe.stages.sequences import TokenizerParams
from dlpipe.stages.sequences.stage import tokenizer

REPO = Path(__file__).resolve().parent.parent


def make_ctx(tmp_path: Path, seed: int = 0, spec_source: str | None = None) -> Any:
    logged: list[tuple[str, str]] = []
    return types.SimpleNamespace(
        seed=seed, data=None, extras={}, run_dir=tmp_path / "run", logged=logged,
        log_artifact=lambda path, artifact_path="": logged.append((str(path), artifact_path)),
        spec=types.SimpleNamespace(source=spec_source), stage=types.SimpleNamespace(id="tokenize"),
    )


# ------------------------------------------------------------------------- csv


def write_table(folder: Path, n: int = 40, name: str = "shop.csv") -> Path:
    """``size`` (numeric), ``color`` (red/green/blue), ``price`` (numeric), ``kind`` (a/b)."""
    rng = np.random.default_rng(0)
    lines = ["size,color,price,kind"]
    for i in range(n):
        lines.append(f"{rng.normal(10, 2):.3f},{('red', 'green', 'blue')[i % 3]},"
                     f"{rng.uniform(1, 5):.2f},{'ab'[i % 2]}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def load_csv(tmp_path: Path, path: Path, **params: Any) -> Any:
    ctx = make_ctx(tmp_path)
    params.setdefault("label", "kind")
    csv_table(ctx, CsvParams(path=str(path), **params))
    return ctx


def csv_error(tmp_path: Path, text: str, **params: Any) -> str:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DlpipeError) as info:
        load_csv(tmp_path, path, **params)
    return str(info.value)


def test_csv_one_hot_encodes_categories_and_standardizes_numbers(tmp_path, capsys):
    ctx = load_csv(tmp_path, write_table(tmp_path), categorical=["color"])
    data = ctx.data
    prep = data.preprocessing
    assert data.task == "classification" and data.class_names == ["a", "b"]
    assert data.input_shape == (5,)
    assert prep.columns == ["size", "color", "price"]
    assert prep.input_names == ["size", "color=blue", "color=green", "color=red", "price"]
    assert prep.categories == {"color": ["blue", "green", "red"]}
    assert prep.numeric == ["size", "price"] and prep.normalize == "standard"
    train = data.x["train"]
    np.testing.assert_allclose(train[:, [0, 4]].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train[:, [0, 4]].std(axis=0), 1.0, atol=1e-5)
    assert set(np.unique(train[:, 1:4])) == {0.0, 1.0}
    assert (train[:, 1:4].sum(axis=1) == 1).all()
    assert prep.center == prep.mean and prep.scale == prep.std
    out = capsys.readouterr().out
    assert "data: shop 28/6/6 train/val/test, shape (5,), 2 classes" in out
    assert "data: shop.csv: one-hot encoded color (3); 2 numeric column(s) scaled (standard)" in out
    assert ctx.extras["data"]["categorical"] == ["color"]

    # The record encodes raw rows as the stage did, and travels as JSON.
    assert ctx.logged == [(str(tmp_path / "run" / "preprocessing" / "preprocessing.json"),
                           "preprocessing")]
    saved = json.loads(Path(ctx.logged[0][0]).read_text())
    again = TablePreprocessing.from_dict(saved)
    assert again == prep and saved["input_names"] == prep.input_names
    rows = [dict(zip(["size", "color", "price"], line.split(",")[:3], strict=True))
            for line in (tmp_path / "shop.csv").read_text().splitlines()[1:]]
    train_rows = [rows[i] for i in split_indices(40, np.arange(40) % 2, 0.15, 0.15,
                                                 0, True)["train"]]
    np.testing.assert_allclose(again.encode(train_rows), train, atol=1e-6)
    # An unseen category and an empty categorical cell are all zeros; numbers may be text.
    x = again.encode([{"size": 10, "color": "purple", "price": "2.5", "kind": "a"},
                      {"size": "10", "color": "", "price": 2.5}])
    assert x.shape == (2, 5) and x.dtype == np.float32
    assert (x[:, 1:4] == 0).all() and x[0, 0] == x[1, 0]


def test_csv_categories_come_from_the_training_split_only(tmp_path):
    path = write_table(tmp_path, n=60)
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1].replace("blue", "violet")  # one row: lands in train, val or test
    path.write_text("\n".join(lines) + "\n")
    for seed in range(6):
        data = load_csv(tmp_path, path, categorical=["color"], seed=seed).data
        in_train = 59 in split_indices(60, np.arange(60) % 2, 0.15, 0.15, seed,
                                       True)["train"]
        assert ("violet" in data.preprocessing.categories["color"]) == in_train


def test_csv_split_is_seeded_and_stratified(tmp_path):
    path = write_table(tmp_path, n=60)
    first = load_csv(tmp_path, path, categorical=["color"]).data
    again = load_csv(tmp_path, path, categorical=["color"]).data
    other = load_csv(tmp_path, path, categorical=["color"], seed=5).data
    np.testing.assert_array_equal(first.x["val"], again.x["val"])
    assert not np.array_equal(first.x["val"], other.x["val"])
    for split in ("train", "val", "test"):
        counts = np.bincount(first.y[split], minlength=2)
        assert abs(int(counts[0]) - int(counts[1])) <= 1
    # color is text and not categorical: with features listed, it can be left out
    assert load_csv(tmp_path, path, features=["price", "size"]).data.preprocessing.columns == [
        "price", "size"]


def test_csv_regression_minmax_and_numeric_class_names(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b,y\n" + "".join(f"{i},{i % 4},{i * 0.5}\n" for i in range(30)))
    data = load_csv(tmp_path, path, label="y", task="regression", normalize="minmax",
                    value_range=(-1, 1)).data
    assert data.task == "regression" and data.num_classes is None
    assert data.y["train"].dtype == np.float32
    assert data.x["train"].min() == pytest.approx(-1) and data.x["train"].max() == pytest.approx(1)
    assert data.value_range == pytest.approx((-1.0, 1.0))
    # whole-number classes are ordered by value, not as text
    path.write_text("a,y\n" + "".join(f"{i},{(2, 10, 9)[i % 3]}\n" for i in range(30)))
    assert load_csv(tmp_path, path, label="y").data.class_names == ["2", "9", "10"]


def test_csv_path_is_found_next_to_the_spec(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    write_table(tmp_path / "specs")
    spec = tmp_path / "specs" / "p.yaml"
    spec.write_text("name: p\n")
    monkeypatch.chdir(tmp_path)
    ctx = make_ctx(tmp_path, spec_source=str(spec))
    csv_table(ctx, CsvParams(path="shop.csv", label="kind", categorical=["color"]))
    assert ctx.data.preprocessing.source == str(tmp_path / "specs" / "shop.csv")
    with pytest.raises(DlpipeError) as info:
        csv_table(ctx, CsvParams(path="shops.csv", label="kind"))
    assert str(info.value) == (
        f"CSV file not found: shops.csv (looked for {tmp_path / 'shops.csv'} or "
        f"{tmp_path / 'specs' / 'shops.csv'}); did you mean: shop.csv?"
    )


def test_csv_file_problems_name_the_file_line_and_column(tmp_path):
    p = tmp_path / "t.csv"
    assert csv_error(tmp_path, "") == (
        f"{p}: the file is empty; expected a header row of column names, then one row per "
        "example")
    assert csv_error(tmp_path, ",a,kind\n0,1,a\n") == (
        f"{p}: column 1 of the header has no name (an index column written by pandas? write "
        "the file with index=False); name every column")
    assert csv_error(tmp_path, "a,b,a\n1,2,3\n") == (
        f"{p}: the header names column 'a' twice (columns 1 and 3); rename one of them")
    assert csv_error(tmp_path, "a,b,kind\n1,2,a\n\n3,b\n") == (
        f"{p}: line 4 has 2 fields, the header 3; every row needs one value per column "
        "(an empty field for a missing value)")
    assert csv_error(tmp_path, 'a,kind\n1,"a"b\n') == (
        f"cannot read {p} as CSV: line 2: ',' expected after '\"'")
    p.write_bytes(b"a,kind\n1,\xff\n")
    with pytest.raises(DlpipeError, match=r"cannot read .*t\.csv as UTF-8 text: 'utf-8' codec"):
        load_csv(tmp_path, p)
    assert csv_error(tmp_path, "a,kind\n1,a\n", label="knd") == (
        f"{p} has no column 'knd' (label); its columns: a, kind; did you mean: kind?")
    assert csv_error(tmp_path, "a,kind\n1,a\n", features=["b"]) == (
        f"{p} has no column 'b' (features); its columns: a, kind")
    assert csv_error(tmp_path, "kind\na\nb\n") == (
        f"{p}: there are no feature columns: the header has only the label column 'kind'")


def test_csv_bad_values_get_the_data_checks_messages(tmp_path):
    p = tmp_path / "t.csv"
    assert csv_error(tmp_path, "a,color,kind\n1,red,a\n2,blue,b\n3,red,a\n") == (
        f"{p}: table is not numeric (dtype <U4, text): 3 of 6 values are not numbers in "
        "column 'color', e.g. 'red' in example 0, column 'color'; features must be numbers "
        "(encode categories as numbers, or leave those columns out); or list text columns "
        "in categorical to one-hot encode them")
    assert csv_error(tmp_path, "a,b,kind\n1,,a\n2,3,b\n,4,a\n") == (
        f"{p}: table has 2 NaN values in 2 of 3 examples (first: example 0; columns 'a', "
        "'b'); drop or fill them before training")
    assert csv_error(tmp_path, "a,kind\n1,a\n2,\n3,b\n4,\n") == (
        f"{p}: label column 'kind' has 2 empty cells in 4 examples (first: example 1); every "
        "example needs a class")
    assert csv_error(tmp_path, "a,kind\n1,a\n2,a\n") == (
        f"{p}: label column 'kind' has a single class ('a'); classification needs at least 2 "
        "(for numeric targets set task: regression)")
    assert csv_error(tmp_path, "a,y\n1,0.5\n2,\n3,1\n", label="y", task="regression") == (
        f"{p}: label column 'y' has 1 NaN value in 1 of 3 examples (first: example 1); drop "
        "or fill them before training")
    assert csv_error(tmp_path, "a,y\n1,0.5\n2,high\n", label="y", task="regression") == (
        f"{p}: label column 'y' is not numeric (dtype <U4, text): 1 of 2 values is not a "
        "number, e.g. 'high' in example 1; labels must be numbers (map class names to "
        "0..num_classes-1)")
    assert csv_error(tmp_path, "a,kind\n1,a\n2,b\n", val_fraction=0.5, test_fraction=0.4) == (
        f"{p}: 2 examples are too few to split into train/val/test with val_fraction 0.5 "
        "and test_fraction 0.4: the test split takes 1 and the val split takes 1, leaving "
        "none for training. These fractions need at least 10 examples; use more data, or "
        "lower val_fraction or test_fraction (0 turns a split off)")
    assert csv_error(tmp_path, "a,kind\n1,a\n2,b\n3,a\n", normalize="minmax",
                     value_range=(1, 1), val_fraction=0, test_fraction=0) == (
        "value_range [1.0, 1.0] must go from low to high")


def test_csv_params_check_the_columns_before_reading():
    with pytest.raises(ValidationError, match="the label column 'y' cannot also be in features"):
        CsvParams(path="t.csv", label="y", features=["a", "y"])
    with pytest.raises(ValidationError, match="categorical lists 'c' more than once"):
        CsvParams(path="t.csv", label="y", categorical=["c", "c"])
    with pytest.raises(ValidationError, match=(
            "categorical column\\(s\\) 'c' are not in features; add them there, or leave "
            "features out to use every column")):
        CsvParams(path="t.csv", label="y", features=["a"], categorical=["c"])


def test_encoding_raw_rows_names_what_is_wrong(tmp_path):
    prep = load_csv(tmp_path, write_table(tmp_path), categorical=["color"]).data.preprocessing
    with pytest.raises(DlpipeError) as info:
        prep.encode([{"size": 1, "color": "red"}])
    assert str(info.value) == ("rows lack the feature column(s) 'price' (expected: size, "
                               "color, price)")
    with pytest.raises(DlpipeError) as info:
        prep.encode([{"size": 1, "color": "red", "price": "cheap"}])
    assert str(info.value) == "column 'price' holds numbers, not 'cheap'"
    assert prep.encode([]).shape == (0, 5)


# ---------------------------------------------------------------- text folders


def write_texts(root: Path, per_class: int = 6) -> Path:
    for topic, word in (("rain", "Wet  clouds"), ("sun", "Hot\nsky"), ("snow", "Cold ice")):
        (root / topic).mkdir(parents=True)
        for i in range(per_class):
            (root / topic / f"{i}.txt").write_text(f"{word} number {i}\n", encoding="utf-8")
    return root


def load_texts(tmp_path: Path, root: Path, **params: Any) -> Any:
    ctx = make_ctx(tmp_path)
    text_directory(ctx, TextDirectoryParams(path=str(root), **params))
    return ctx


def test_text_directory_reads_classes_and_tokenizes_per_character(tmp_path, capsys):
    root = write_texts(tmp_path / "texts")
    (root / "empty_class").mkdir()
    (root / "sun" / "blank.txt").write_text("  \n")
    (root / "sun" / "notes.md").write_text("not a text example")
    (root / "snow" / "LOUD.TXT").write_text("COLD ICE")
    ctx = load_texts(tmp_path, root, lowercase=True, val_fraction=0.2, test_fraction=0.2)
    data = ctx.data
    assert isinstance(data, TextClassBundle)
    assert data.class_names == ["rain", "snow", "sun"] and data.num_classes == 3
    assert sum(data.size(s) for s in ("train", "val", "test")) == 19
    texts = [t for s in ("train", "val", "test") for t in data.texts[s]]
    assert "wet clouds number 0" in texts and "hot sky number 1" in texts
    assert "cold ice" in texts
    assert data.vocab.level == "char" and data.x["train"].dtype == np.int32
    assert data.vocab.decode(data.x["train"][0]) == data.texts["train"][0]
    for split in ("train", "val", "test"):
        assert set(np.bincount(data.y[split], minlength=3)) <= {1, 2, 3, 4, 5}
    assert [a for _, a in ctx.logged] == ["vocab"]
    out = capsys.readouterr().out
    assert "data: text_directory ignores empty class folder(s): empty_class" in out
    assert "data: text_directory ignores 1 empty file(s): sun/blank.txt" in out
    assert "data: texts 11/4/4 train/val/test, char tokens, vocab" in out
    cut = load_texts(tmp_path, root, max_chars=3, seed=1).data
    assert max(len(t) for s in ("train", "val", "test") for t in cut.texts[s]) == 3


def test_the_tokenizer_re_tokenizes_text_folders(tmp_path, capsys):
    ctx = load_texts(tmp_path, write_texts(tmp_path / "texts"))
    char = ctx.data
    tokenizer(ctx, TokenizerParams(level="subword", vocab_size=40))
    sub = ctx.data
    assert isinstance(sub, TextClassBundle) and sub.vocab.level == "subword"
    assert sub.texts == char.texts and sub.class_names == char.class_names
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(sub.y[split], char.y[split])
    assert sub.sequence_length < char.sequence_length
    assert [sub.vocab.decode(ids) for ids in sub.x["test"]] == sub.texts["test"]
    assert "subword tokens, vocab 40" in capsys.readouterr().out
    with pytest.raises(DlpipeError) as info:
        tokenizer(ctx, TokenizerParams(apply_to="target"))
    assert str(info.value) == (
        "stage 'tokenize': apply_to: target re-tokenizes target texts, but 'texts' is text "
        "classification data, which has none; use apply_to: source (or both)")
    ctx = load_csv(tmp_path, write_table(tmp_path), features=["size", "price"])
    with pytest.raises(DlpipeError) as info:
        tokenizer(ctx, TokenizerParams())
    assert str(info.value) == (
        "stage 'tokenize': the tokenizer needs a data stage of texts before it (seq_addition, "
        "seq_dates, seq_reverse, seq_sort, seq_arith_check or text_directory)")


def test_text_directory_problems(tmp_path):
    def error(root: Path, **params: Any) -> str:
        with pytest.raises(DlpipeError) as info:
            load_texts(tmp_path, root, **params)
        return str(info.value)

    root = tmp_path / "t"
    root.mkdir()
    layout = f"expected one sub-folder of .txt files per class: {root}/<class>/<name>.txt"
    (root / "loose.txt").write_text("hi")
    assert error(root) == (f"no .txt files found in {root} (found 1 .txt file(s) directly in "
                           f"{root}, but none in class sub-folders); {layout}")
    file = root / "loose.txt"
    assert error(file) == (f"{file} is not a folder; expected one sub-folder of .txt files per "
                           f"class: {file}/<class>/<name>.txt")
    (root / "only").mkdir()
    (root / "only" / "a.txt").write_text("a")
    assert error(root) == (f"{root}: only one class folder has .txt files (only); "
                           "classification needs at least 2")
    (root / "other").mkdir()
    (root / "other" / "b.txt").write_bytes(b"caf\xe9")
    assert error(root).startswith(f"cannot read {root / 'other' / 'b.txt'} as utf-8 text: ")
    assert error(root).endswith("; set encoding to the files' encoding")
    assert error(root, encoding="klingon") == (
        "unknown text encoding 'klingon' (e.g. utf-8, latin-1)")
    assert error(root, encoding="latin-1", val_fraction=0.3, test_fraction=0.3).startswith(
        f"{root}: 2 examples are too few to split into train/val/test")
    assert error(tmp_path / "nowhere").startswith("text folder not found: ")


# -------------------------------------------------------------------- pipelines


def _run(name: str, *sets: str) -> None:
    from dlpipe.cli import main

    args = ["run", str(REPO / "pipelines" / f"{name}.yaml")]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0


def _finished_run(experiment: str) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


def _model(client: Any, run: Any, workdir: Path) -> Any:
    import keras

    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    return keras.saving.load_model(local)


@pytest.mark.slow
def test_csv_wine_pipeline_serves_raw_rows_through_its_preprocessing(workdir):
    _run("csv_wine", "train.epochs=8")
    client, run = _finished_run("dlpipe-tabular")
    rid = run.info.run_id
    assert run.data.metrics["test_accuracy"] >= 0.8
    assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(rid, "plots")}
    saved = client.download_artifacts(rid, "preprocessing/preprocessing.json", str(workdir))
    prep = TablePreprocessing.from_dict(json.loads(Path(saved).read_text()))
    assert prep.label == "cultivar" and len(prep.columns) == 13
    assert prep.class_names == ["class_0", "class_1", "class_2"]

    # Raw CSV rows of the test split, encoded by the logged record, score as evaluated.
    header, rows = read_csv(REPO / "data" / "wine.csv")
    names = [r[-1] for r in rows]
    y = np.asarray([prep.class_names.index(n) for n in names])
    test = split_indices(len(rows), y, 0.2, 0.2, 42, True)["test"]
    raw = [dict(zip(header, rows[i], strict=True)) for i in test]
    probs = np.asarray(_model(client, run, workdir).predict(prep.encode(raw), verbose=0))
    accuracy = float(np.mean(probs.argmax(axis=1) == y[test]))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_text_topics_pipeline_classifies_the_text_folder(workdir):
    _run("text_topics", "train.epochs=3")
    client, run = _finished_run("dlpipe-sequence")
    rid = run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "val_accuracy")] == [0, 1, 2]
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {"plots/cls_attention.png", "plots/confusion_matrix.png"} <= plots
    vocab_file = client.download_artifacts(rid, "vocab/vocab.json", str(workdir))
    doc = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    assert doc["classes"] == ["cooking", "sports", "weather"]
    vocab = Vocabulary.from_dict(doc["source"])
    assert vocab.level == "subword"

    # A new text, tokenized with the logged vocabulary, gets class probabilities.
    model = _model(client, run, workdir)
    ids = encode_texts(["fry the carrots in butter."], vocab, int(model.max_length), end=False)
    probs = np.asarray(model.predict(ids, verbose=0))
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-4)
