"""Using what you trained: dlpipe runs, compare, predict, serve, and the links that
dlpipe run and dlpipe ui print. Two tiny XOR runs (a few seconds each) share one store."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlpipe import runs
from dlpipe.cli import main
from dlpipe.errors import DlpipeError

REPO = Path(__file__).resolve().parent.parent
XOR = str(REPO / "pipelines" / "xor.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Store:
    folder: Path
    uri: str
    first: str  # run id: 3 epochs
    second: str  # run id: 4 epochs, another learning rate (the newest)
    experiment_id: str
    run_output: str  # what `dlpipe run` printed for the second run
    run_dir: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two XOR runs in a private store; the tests run in its folder."""
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("DLPIPE_HOME", raising=False)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["run", XOR, "--set", "train.epochs=3"]) == 0
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["run", XOR, "--set", "train.epochs=4",
                         "--set", "train.optimizer.learning_rate=0.05"]) == 0
        uri = f"sqlite:///{(folder / 'mlruns' / 'mlflow.db').as_posix()}"
        client = runs.open_store(uri)
        found = client.search_runs(runs._experiment_ids(client),
                                   order_by=["attributes.start_time ASC"])
        assert len(found) == 2
        first, second = found
        run_dir = folder / second.data.tags["dlpipe.run_dir"]
        yield Store(folder, uri, first.info.run_id, second.info.run_id,
                    str(second.info.experiment_id), out.getvalue(), run_dir)


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


# --------------------------------------------------------------------------------------
# dlpipe run: the end-of-run summary
# --------------------------------------------------------------------------------------


def test_run_ends_with_a_summary(store):
    out = store.run_output
    summary = out[out.index("dlpipe: done; outputs in"):]
    assert re.search(r"^  best epoch  \d+ \(val_loss \d", summary, re.M), summary
    assert re.search(r"^  test        accuracy=[\d.]+, loss=", summary, re.M)
    run_dir = os.path.relpath(store.run_dir, store.folder)
    assert f"  plots       {run_dir}/plots (5 PNG)" in summary
    assert f"  model       {run_dir}/model/model.keras" in summary
    url = (f"http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs/{store.second}"
           "?workflowType=machine_learning")
    assert f"  run         {url}  (after `dlpipe ui`)" in summary
    assert f"  predict     dlpipe predict {store.second[:8]} INPUT" in summary


def test_untracked_run_summary_has_no_link(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.keras").write_bytes(b"")
    metrics = {"test_loss": 0.25, "test_recall_0": 1.0, "test_recall_1": 0.5}
    ctx = SimpleNamespace(run_dir=tmp_path, run_id=None, metrics=metrics)
    lines = runs.run_summary(ctx, None)
    assert lines == ["  test        loss=0.25 (+2 more in MLflow)",
                     f"  model       {tmp_path}/model/model.keras"]


def test_run_links_use_the_classic_training_view():
    assert runs.run_url("3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert runs.experiment_url("3", "0.0.0.0", 8080) == \
        "http://0.0.0.0:8080/#/experiments/3?workflowType=machine_learning"


# --------------------------------------------------------------------------------------
# dlpipe runs
# --------------------------------------------------------------------------------------


def test_runs_lists_a_table_of_runs(store, capsys):
    assert main(["runs"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0] == f"runs in {store.uri}, newest first:"
    header = out[1].split()
    assert header == ["run", "name", "status", "start", "duration", "test_accuracy",
                      "train.epochs", "train.optimizer.learning_rate"]
    newest, oldest = out[2].split(), out[3].split()
    assert newest[:3] == [store.second[:8], "xor", "FINISHED"]
    assert oldest[:3] == [store.first[:8], "xor", "FINISHED"]
    assert re.fullmatch(r"[\d.hms]+", newest[5]) and float(newest[6]) <= 1.0
    assert newest[-2:] == ["4", "0.05"] and oldest[-2:] == ["3", "0.02"]
    assert out[4] == f"compare: dlpipe compare {store.second[:8]} {store.first[:8]}"
    assert out[-1] == f"MLflow CLI: export MLFLOW_TRACKING_URI={store.uri}"


def test_runs_filter_limit_and_experiment(store, capsys):
    assert main(["runs", "--filter", "params.train.epochs = '3'"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0].startswith("runs matching \"params.train.epochs = '3'\" in ")
    assert [line.split()[0] for line in out[2:-2]] == [store.first[:8]]
    assert out[-2] == f"predict: dlpipe predict {store.first[:8]} INPUT"

    assert main(["runs", "--limit", "1", "--experiment", "dlpipe-training"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0] == f"runs in experiment 'dlpipe-training' in {store.uri}, newest first:"
    assert out[2].split()[0] == store.second[:8]
    assert "(the newest 1 runs; --limit N shows more)" in out

    assert main(["runs", "--filter", "metrics.test_accuracy > 2"]) == 0
    assert lines_of(capsys.readouterr().out) == [
        f"no runs matching 'metrics.test_accuracy > 2' in {store.uri}",
        f"MLflow CLI: export MLFLOW_TRACKING_URI={store.uri}",
    ]


def test_runs_reports_bad_options(store, capsys):
    assert main(["runs", "--filter", "metrics.test_loss <"]) == 2
    err = capsys.readouterr().err
    assert "error: --filter 'metrics.test_loss <': " in err
    assert "MLflow's search syntax, e.g. \"metrics.test_accuracy > 0.9\"" in err
    assert main(["runs", "--experiment", "dlpipe-trainin"]) == 2
    assert ("--experiment dlpipe-trainin: no such experiment in "
            f"{store.uri}; did you mean: dlpipe-training") in capsys.readouterr().err
    assert main(["runs", "--experiment", "zzz"]) == 2
    assert "experiments there: Default, dlpipe-training" in capsys.readouterr().err
    assert main(["runs", "--limit", "0"]) == 2
    assert "--limit 0: expected a number of runs >= 1" in capsys.readouterr().err


def test_runs_without_a_store_does_not_create_one(workdir, capsys):
    assert main(["runs"]) == 2
    err = capsys.readouterr().err
    assert f"no runs yet: the tracking store {workdir}/mlruns/mlflow.db does not exist" in err
    assert "pass --tracking-uri" in err
    assert not (workdir / "mlruns").exists()


def test_runs_table_shows_few_param_columns():
    def run(i):
        info = SimpleNamespace(run_id=f"{i:032x}", run_name=f"r{i}", status="FINISHED",
                               start_time=1_000, end_time=61_000 + i)
        params = {f"p{k}": str(i * k) for k in range(9)} | {"same": "x"}
        return SimpleNamespace(info=info, data=SimpleNamespace(
            params=params, metrics={"test_loss": 0.5, f"test_m{i}": 1.0}))

    table, shown, hidden = runs.runs_table([run(1), run(2)])
    assert shown == ["p1", "p2", "p3", "p4", "p5", "p6"] and hidden == ["p7", "p8"]
    assert table[0].split()[5] == "test_loss" and "1m00s" in table[1]
    mixed = [run(1), run(2)]
    mixed[1].data.metrics = {"test_m2": 0.75}
    table, _, _ = runs.runs_table(mixed)
    assert table[0].split()[5:7] == ["key", "metric"]
    assert "test_loss=0.5" in table[1] and "test_m2=0.75" in table[2]


# --------------------------------------------------------------------------------------
# dlpipe compare
# --------------------------------------------------------------------------------------


def test_compare_prints_params_metrics_and_writes_curves(store, capsys, tmp_path):
    plot = tmp_path / "curves.png"
    assert main(["compare", store.first[:8], store.second, "-o", str(plot)]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0].split() == ["run", store.first[:8], store.second[:8]]
    assert out[1].split() == ["name", "xor", "xor"]
    assert out[2].split() == ["status", "FINISHED", "FINISHED"]
    at = out.index("params that differ:")
    assert out[at + 1].split() == ["train.epochs", "3", "4"]
    assert out[at + 2].split() == ["train.optimizer.learning_rate", "0.02", "0.05"]
    assert out[at + 3] == "final metrics:"
    metrics = [line.split()[0] for line in out[at + 4:-2]]
    assert metrics[0].startswith("test_") and "best_epoch" in metrics and "val_loss" in metrics
    assert metrics.index("best_epoch") > metrics.index("test_loss")
    assert out[-2] == f"wrote {plot} (learning curves: loss, accuracy)"
    assert out[-1] == f"MLflow CLI: export MLFLOW_TRACKING_URI={store.uri}"
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_compare_by_run_name_uses_the_newest(store, capsys):
    assert main(["compare", "xor", store.first]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0].startswith(f"xor: 2 runs are named so; using the newest, {store.second[:8]} (")
    assert out[1].split() == ["run", store.second[:8], store.first[:8]]
    assert (store.folder / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_errors(store, capsys):
    assert main(["compare", store.first]) == 2
    assert "compare needs at least two runs" in capsys.readouterr().err
    assert main(["compare", store.first, store.first[:6]]) == 2
    assert f"are the same run ({store.first}); compare needs two different runs" in \
        capsys.readouterr().err
    assert main(["compare", store.first, "xr"]) == 2
    assert f"xr: no run with this id, id prefix or name in {store.uri}; did you mean: xor" in \
        capsys.readouterr().err
    assert main(["compare", store.first, "ffffffffffffffffffffffffffffffff"]) == 2
    assert f"ffffffffffffffffffffffffffffffff: no such run in {store.uri}" in \
        capsys.readouterr().err


def test_an_ambiguous_id_prefix_lists_the_candidates():
    def run(run_id, name):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name, start_time=0))

    listing = [run("ab12" + "0" * 28, "one"), run("ab13" + "0" * 28, "two")]
    resolver = runs.RunResolver(client=None, uri="sqlite:////x.db", _runs=listing)
    assert resolver.resolve("ab13").info.run_name == "two"
    with pytest.raises(DlpipeError, match=r"ab: 2 runs have ids starting so; give more of "
                       r"the id: ab1200000000 \(one\), ab1300000000 \(two\)"):
        resolver.resolve("ab")
    with pytest.raises(DlpipeError, match="dlpipe runs lists the runs"):
        resolver.resolve("zzzzzzzz")


class Page(list):
    token = None


class BareStore:
    """Two runs with final metrics only, as MlflowClient shows them."""

    def __init__(self):
        self.runs = [
            SimpleNamespace(
                info=SimpleNamespace(run_id=f"{i:032x}", run_name=f"bare-{i}",
                                     status="FINISHED", start_time=1_000 * i, end_time=None),
                data=SimpleNamespace(params={"seed": "1"}, metrics={"test_accuracy": i / 4}),
            )
            for i in (1, 2)
        ]

    def search_experiments(self):
        return [SimpleNamespace(experiment_id="1", name="bare")]

    def search_runs(self, ids, max_results, page_token, order_by):
        return Page(self.runs)

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=0, timestamp=0, value=0.5)]


def test_compare_without_epochs_writes_no_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runs, "open_store", lambda uri: BareStore())
    plot = tmp_path / "compare.png"
    lines = runs.compare_report("sqlite:////x.db", ["bare-1", "bare-2"], plot)
    assert lines[0].split() == ["run", f"{1:032x}"[:8], f"{2:032x}"[:8]]
    assert "  (none: every param is the same)" in [line.rstrip() for line in lines]
    assert lines[-2] == "no learning curves to plot: these runs logged no per-epoch metrics"
    assert not plot.exists()


# --------------------------------------------------------------------------------------
# dlpipe ui
# --------------------------------------------------------------------------------------


def test_ui_prints_the_landing_url_of_the_latest_experiment(store, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("dlpipe.cli.os.execv", lambda path, argv: started.append(argv))
    assert main(["ui", "--port", "5999"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out == [
        f"MLflow UI for {store.uri} at http://127.0.0.1:5999  (Ctrl+C to stop)",
        f"latest experiment 'dlpipe-training': http://127.0.0.1:5999/#/experiments/"
        f"{store.experiment_id}?workflowType=machine_learning",
        f"MLflow CLI: export MLFLOW_TRACKING_URI={store.uri}",
    ]
    assert started and started[0][1:4] == ["-m", "mlflow", "ui"]


# --------------------------------------------------------------------------------------
# dlpipe predict
# --------------------------------------------------------------------------------------


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_a_spec_test_split(store, capsys, tmp_path):
    out_file = tmp_path / "test.csv"
    assert main(["predict", store.second[:8], XOR, "-o", str(out_file)]) == 0
    out = lines_of(capsys.readouterr().out)
    model_line = next(line for line in out if line.startswith("model: "))
    assert model_line.startswith(f"model: runs:/{store.second}/model")
    assert f"input: 52 examples from the test split of {XOR}" in out
    assert out[-1].startswith(f"wrote {out_file} (52 rows; columns input, true_label, ")
    rows = read_table(out_file)
    assert len(rows) == 52 and rows[0]["input"] == "0" and rows[0]["true_label"] in ("0", "1")


def test_predict_on_csv_and_npz(store, capsys):
    Path("points.csv").write_text("a,b,label\n0,0,0\n0,1,1\n1,0,1\n1,1,0\n")
    assert main(["predict", "xor", "points.csv"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0].startswith(f"xor: 2 runs are named so; using the newest, {store.second[:8]} (")
    assert "input: 4 examples from points.csv" in out
    assert out[-1].startswith("wrote predictions.csv (4 rows; columns input, true_label, ")
    assert [r["true_label"] for r in read_table(Path("predictions.csv"))] == ["0", "1", "1", "0"]

    np.savez("points.npz", x=np.array([[0, 1], [1, 1]], dtype=np.float32))
    assert main(["predict", store.first, "points.npz", "-o", "out/points.npz"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert "input: 2 examples from points.npz" in out
    assert re.fullmatch(r"wrote out/points\.npz \(.*\(2, 2\).*\)", out[-1]), out[-1]
    with np.load("out/points.npz") as saved:
        assert all(len(saved[k]) == 2 for k in saved.files)


def test_predict_reports_bad_references_and_inputs(store, capsys):
    assert main(["predict", "nosuchrun", "points.csv"]) == 2
    assert "nosuchrun: no run with this id, id prefix or name" in capsys.readouterr().err
    Path("bad.csv").write_text("a,b\n0,zero\n")
    assert main(["predict", store.first, "bad.csv"]) == 2
    assert "bad.csv:2: column b: 'zero' is not a number" in capsys.readouterr().err
    np.savez("wide.npz", x=np.zeros((2, 3), dtype=np.float32))
    assert main(["predict", store.first, "wide.npz"]) == 2
    err = capsys.readouterr().err
    assert "wide.npz: the model could not predict on these inputs (shape (2, 3))" in err
    assert "It takes " in err and "shape (n, 2)" in err


class FakePredictor:
    """Doubles images: enough to check reading a folder and writing a grid."""

    task = "generative"
    input_description = {"kind": "image", "dtype": "float32", "shape": [None, 8, 8, 1],
                         "text": "images"}
    meta: dict = {}

    def predict(self, raw):
        return {"image": raw * 2.0}


def test_predict_on_a_folder_of_images_writes_a_grid(workdir, capsys, monkeypatch):
    from PIL import Image

    from dlpipe import predict

    folder = workdir / "images"
    folder.mkdir()
    for i, size in enumerate([(8, 8), (16, 12), (8, 8)]):
        Image.new("RGB", size, (40 * i, 80, 120)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    monkeypatch.setattr(predict, "load_model",
                        lambda text, uri: predict.LoadedModel("fake:/model", FakePredictor()))
    assert main(["predict", "anything", str(folder)]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0] == "model: fake:/model (task generative; takes images; shape (n, 8, 8, 1))"
    assert out[1] == f"input: 3 examples from 3 images in {folder}"
    assert out[2].startswith("  image: shape (3, 8, 8, 1), values ")
    assert out[-2] == "wrote predictions.png (grid of 3 of 3 images: image)"
    assert out[-1] == "wrote predictions.npz (image (3, 8, 8, 1))"
    assert Path("predictions.png").read_bytes()[:8] == PNG_MAGIC
    with np.load("predictions.npz") as saved:
        assert saved["image"].shape == (3, 8, 8, 1)


def test_input_errors(tmp_path):
    from dlpipe.predict import read_inputs

    cases = {
        "missing.npz": "missing.npz: no such file or folder",
        "one.png": "give the folder the images are in, not one image",
        "data.txt": "unknown input kind .txt; expected .npz, .npy, .csv",
        "empty.csv": "empty.csv: is empty",
        "header.csv": "header.csv: has a header but no rows",
        "ragged.csv": "ragged.csv:3: 1 values; the first row has 2",
        "folder": "folder: no images (.png, .jpg, ...) in this folder",
        "labels.npz": "labels.npz: holds no input arrays",
    }
    (tmp_path / "one.png").write_bytes(PNG_MAGIC)
    (tmp_path / "data.txt").write_text("1 2\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("a,b\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3,4\n5\n")
    (tmp_path / "folder").mkdir()
    np.savez(tmp_path / "labels.npz", y=np.zeros(3))
    for name, message in cases.items():
        with pytest.raises(DlpipeError, match=re.escape(message)):
            read_inputs(str(tmp_path / name))
    from PIL import Image

    from dlpipe.predict import Expected

    for size in ((8, 8), (9, 9)):
        Image.new("L", size).save(tmp_path / "folder" / f"{size[0]}.png")
    with pytest.raises(DlpipeError, match="the images have different sizes"):
        read_inputs(str(tmp_path / "folder"))
    resized = read_inputs(str(tmp_path / "folder"), Expected("image", [None, 4, 4, 3]))
    assert resized.x.shape == (2, 4, 4, 3) and resized.names == ["8.png", "9.png"]


def test_output_format_errors():
    from dlpipe.predict import Inputs, write_outputs

    table = {"label": np.array([0, 1]), "probabilities": np.eye(2)}
    images = {"image": np.zeros((2, 8, 8, 1))}
    inputs = Inputs(np.zeros((2, 2)), "test")
    with pytest.raises(DlpipeError, match=r"-o out\.txt: unknown output format; use \.csv"):
        write_outputs(table, inputs, "out.txt")
    with pytest.raises(DlpipeError, match=r"these predictions are not images \(label \(2,\), "
                       r"probabilities \(2, 2\)\); write them as \.csv"):
        write_outputs(table, inputs, "out.png")
    with pytest.raises(DlpipeError, match=r"these predictions are not a table \(image "
                       r"\(2, 8, 8, 1\)\); write them as \.png"):
        write_outputs(images, inputs, "out.csv")


def test_summary_of_classes_and_texts():
    from dlpipe.predict import Inputs, summary

    outputs = {"probabilities": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
               "label": np.array([0, 1, 0]), "class_name": np.array(["cat", "dog", "cat"])}
    lines = summary(outputs, Inputs(np.zeros((3, 2)), "t", labels=np.array([0, 1, 1])))
    assert lines == ["  predicted: cat x2, dog x1",
                     "  accuracy against the input's labels: 0.6667 (2/3)"]
    texts = {"text": np.array(["a", "b", "c", "d"], dtype=object)}
    assert summary(texts, Inputs(np.zeros(4), "t")) == ["  text: 'a'; 'b'; 'c' ..."]


# --------------------------------------------------------------------------------------
# dlpipe serve
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_a_taken_port_and_a_bare_keras_file(store, capsys):
    from dlpipe.predict import serve_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        assert main(["serve", store.first, "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}: " in capsys.readouterr().err
    keras_file = store.folder / os.path.relpath(store.run_dir, store.folder) / "model" / "model.keras"
    assert main(["serve", str(keras_file), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "is a bare Keras file, not an MLflow model" in err and "Use dlpipe predict" in err
    assert serve_command("runs:/x/model", "127.0.0.1", 5001)[1:] == [
        "-m", "mlflow", "models", "serve", "-m", "runs:/x/model", "--env-manager", "local",
        "-h", "127.0.0.1", "-p", "5001"]


@pytest.fixture(scope="module")
def servable(store):
    """The newest run's MLflow (pyfunc) model, which the scoring server loads."""
    packaging = pytest.importorskip("dlpipe.packaging", reason="dlpipe.packaging is not there yet")
    if packaging.resolve_model_uri(store.second, store.uri).endswith(".keras"):
        pytest.skip("the run logged a bare model.keras, not an MLflow (pyfunc) model: "
                    "tracking does not log dlpipe.packaging's model yet")
    return store.second


def test_predict_with_an_mlflow_model(store, servable, capsys):
    Path("points.csv").write_text("a,b,label\n0,0,0\n0,1,1\n1,0,1\n1,1,0\n")
    assert main(["predict", servable, "points.csv", "-o", "mlflow.csv"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert re.fullmatch(r"  predicted: (\S+ x\d+(, )?)+", out[2]), out
    assert out[3].startswith("  accuracy against the input's labels: ")
    columns = list(read_table(Path("mlflow.csv"))[0])
    assert columns[:4] == ["input", "true_label", "label", "class_name"]
    assert columns[4:] == ["probabilities_0", "probabilities_1"]


def test_serve_answers_invocations(store, servable):
    port = free_port()
    log = store.folder / "serve.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlpipe", "serve", servable, "--port", str(port)],
            stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        answer, deadline = None, time.time() + 180
        body = json.dumps({"inputs": [[0.0, 1.0], [1.0, 1.0]]}).encode()
        request = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
        while answer is None and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                pytest.fail(f"the scoring server answered {exc.code}: {exc.read()[:500]!r}")
            except OSError:
                time.sleep(1)
        printed = log.read_text()
        assert answer is not None, f"the scoring server did not answer:\n{printed[-3000:]}"
        predictions = answer["predictions"]
        assert len(predictions["label"]) == 2 and len(predictions["probabilities"][0]) == 2
        lines = lines_of(printed[printed.index("serving "):])
        assert lines[0].startswith("serving ") and lines[0].endswith(f"from {store.uri}")
        assert lines[1].startswith(f"  POST JSON to {url}  (Ctrl+C to stop")
        assert lines[2].startswith(f"  example: curl -s {url} -H 'Content-Type: "
                                   "application/json' -d '{\"inputs\": [[")
        assert lines[3] == f"  MLflow CLI: export MLFLOW_TRACKING_URI={store.uri}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
