"""Models that travel: the logged MLflow model, raw inputs, exports and the registry.

Two tiny tracked runs of a LeNet on the embedded digits (resized to 16x16, minmax to
[-1, 1], registered as ``digits-lenet@champion``) and one untracked MLP on iris
(``standard`` normalization) feed every test. One fresh Python process loads what they
logged through ``mlflow.pyfunc``, the MLflow Keras flavour and the SavedModel, on RAW
inputs, and its predictions must be those of the pipeline's own model on the data it
evaluated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dlpipe.errors import DlpipeError, SpecError
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, validate

pytestmark = pytest.mark.slow

NAME = "digits-lenet"

DIGITS = """\
name: lenet-%(seed)s
experiment: packaging
seed: %(seed)s
tracking: {register: {name: digits-lenet, alias: champion}}
stages:
  - kind: data
    use: sklearn_digits
    params: {limit: 360, image_size: [16, 16], normalize: minmax, value_range: [-1, 1]}
  - {kind: model, use: lenet, params: {filters: [4, 8], units: [16, 8]}}
  - {kind: train, use: keras_fit, params: {epochs: 2, batch_size: 64, verbose: 0}}
  - {kind: evaluate, use: keras_evaluate}
"""

IRIS = """\
name: iris
seed: 5
tracking: {enabled: false}
stages:
  - {kind: data, use: sklearn_iris, params: {normalize: standard}}
  - {kind: model, use: mlp, params: {hidden: [8]}}
  - {kind: train, use: keras_fit, params: {epochs: 3, batch_size: 32, verbose: 0}}
"""


def run_spec(host, text):
    from dlpipe.engine import run_pipeline

    return run_pipeline(validate(load_yaml(text, "spec.yaml"), host.registry), host)


def raw_digits_test(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split of the digits run, as load_digits has it: 8x8, values 0..16."""
    from sklearn.datasets import load_digits

    from dlpipe.data import split_indices

    digits = load_digits()
    x, y = digits.images[:360][..., None], digits.target[:360]  # float64, as sklearn has it
    test = split_indices(360, y, 0.15, 0.15, seed, True)["test"]
    return x[test], y[test]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two registered digits runs (versions 1 and 2) and an iris model saved locally."""
    from dlpipe import packaging
    from dlpipe.paths import default_tracking_uri

    folder = tmp_path_factory.mktemp("packaging")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("DLPIPE_HOME", raising=False)
        host = load_plugins(plugin_dirs=[], entry_points=False)
        first = run_spec(host, DIGITS % {"seed": 3})
        second = run_spec(host, DIGITS % {"seed": 4})
        iris = run_spec(host, IRIS)
        iris_dir = packaging.save_model(
            iris.model, iris.data, folder / "iris_model", host.registry.models["mlp"], iris
        )
        uri = default_tracking_uri()
    raw_x, raw_y = raw_digits_test(4)
    return {
        "folder": folder, "uri": uri, "first": first, "second": second,
        "raw_x": raw_x, "raw_y": raw_y,
        # What the pipeline's own model predicted for the test split it evaluated.
        "expected": np.asarray(second.model.predict(second.data.x["test"], verbose=0)),
        "iris": iris, "iris_dir": iris_dir,
    }


FRESH = """
import json, sys
import numpy as np
assert not [m for m in sys.modules if m.startswith(("dlpipe", "tensorflow", "keras"))]
import mlflow, mlflow.keras, mlflow.pyfunc
import pandas as pd

out = {}
raw = np.load(sys.argv[1] + "/raw.npy")
model = mlflow.pyfunc.load_model("models:/digits-lenet@champion")
pred = model.predict(raw)
out["pyfunc_probabilities"] = pred["probabilities"].tolist()
out["pyfunc_label"] = pred["label"].tolist()
out["pyfunc_class_name"] = pred["class_name"].tolist()
out["signature"] = model.metadata.get_input_schema().to_dict()

iris = pd.read_json(sys.argv[1] + "/iris.json", orient="split")
out["iris"] = mlflow.pyfunc.load_model(sys.argv[2]).predict(iris)["probabilities"].tolist()

# The Keras flavour: one import registers every architecture's classes.
import dlpipe.packaging
dlpipe.packaging.register_custom_objects()
keras_model = mlflow.keras.load_model("models:/digits-lenet@champion")
out["keras"] = keras_model.predict(np.load(sys.argv[1] + "/normalized.npy"), verbose=0).tolist()

# The SavedModel needs no dlpipe classes and takes raw inputs too.
import tensorflow as tf
local = mlflow.artifacts.download_artifacts("models:/digits-lenet@champion")
saved_model = tf.saved_model.load(local + "/saved_model")
served = saved_model.serve(tf.constant(raw, tf.float32))
out["saved_model"] = np.asarray(served).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh(runs):
    """What one new Python process predicts with the logged models."""
    folder = runs["folder"]
    np.save(folder / "raw.npy", runs["raw_x"])
    np.save(folder / "normalized.npy", runs["second"].data.x["test"])
    iris_raw = raw_iris_test(runs["iris"])
    iris_raw.to_json(folder / "iris.json", orient="split")
    env = {**os.environ, "MLFLOW_TRACKING_URI": runs["uri"], "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH), str(folder), str(runs["iris_dir"])],
        capture_output=True, text=True, timeout=300, env=env, cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def raw_iris_test(ctx):
    """The iris run's test split in centimetres, as a DataFrame with the column names."""
    import pandas as pd
    from sklearn.datasets import load_iris

    from dlpipe.data import split_indices

    iris = load_iris()
    test = split_indices(150, iris.target, 0.15, 0.15, 5, True)["test"]
    return pd.DataFrame(iris.data[test], columns=iris.feature_names)


def test_logged_model_is_an_mlflow_model(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["uri"])
    run_id = runs["second"].run_id
    names = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/model.keras", "model/dlpipe.json", "model/saved_model",
            "model/requirements.txt", "model/serving_input_example.json"} <= names
    local = client.download_artifacts(run_id, "model", str(runs["folder"] / "download"))
    requirements = Path(local, "requirements.txt").read_text().split()
    assert any(r.startswith("dlpipe==") for r in requirements)
    assert any(r.startswith("tensorflow") for r in requirements)
    meta = json.loads(Path(local, "dlpipe.json").read_text())
    assert meta["task"] == "classification" and meta["mode"] == "classify"
    # The normalization the data stage fitted on the training split: 0..16 -> [-1, 1].
    prep = meta["preprocessing"]
    assert prep["method"] == "minmax" and prep["target"] == [-1.0, 1.0]
    assert prep["image_size"] == [16, 16] and prep["high"] > prep["low"] >= 0.0
    assert meta["exports"]["saved_model"] == "ok"


def test_fresh_process_predicts_from_raw_inputs_like_the_pipeline(runs, fresh):
    expected = runs["expected"]
    got = np.asarray(fresh["pyfunc_probabilities"])
    # Raw 8x8 digits in 0..16: the model resizes and normalizes them itself.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert fresh["pyfunc_label"] == expected.argmax(axis=1).tolist()
    assert fresh["pyfunc_class_name"] == [str(i) for i in expected.argmax(axis=1)]
    accuracy = float(np.mean(np.asarray(fresh["pyfunc_label"]) == runs["raw_y"]))
    assert accuracy == pytest.approx(runs["second"].metrics["test_accuracy"])
    # Any image size goes in (the data stage resized): the signature leaves it open.
    assert fresh["signature"][0]["tensor-spec"]["shape"] == [-1, -1, -1, 1]


def test_keras_flavour_and_saved_model_load_in_a_fresh_process(runs, fresh):
    np.testing.assert_allclose(np.asarray(fresh["keras"]), runs["expected"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(fresh["saved_model"]), runs["expected"], rtol=1e-3, atol=1e-4
    )


def test_table_model_takes_raw_feature_rows(runs, fresh):
    iris = runs["iris"]
    expected = iris.model.predict(iris.data.x["test"], verbose=0)
    np.testing.assert_allclose(np.asarray(fresh["iris"]), expected, rtol=1e-4, atol=1e-5)


def test_registry_versions_and_alias(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["uri"])
    versions = {str(v.version): v.run_id for v in client.search_model_versions(f"name='{NAME}'")}
    assert versions == {"1": runs["first"].run_id, "2": runs["second"].run_id}
    # The alias moved to the newest run's model.
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"


def test_resolve_model_uri_forms(runs):
    from dlpipe.packaging import resolve_model_uri

    uri, run_id = runs["uri"], runs["second"].run_id
    assert resolve_model_uri(run_id, uri) == f"runs:/{run_id}/model"
    assert resolve_model_uri(run_id[:8], uri) == f"runs:/{run_id}/model"  # as dlpipe prints it
    assert resolve_model_uri(f"runs:/{run_id}/model", uri) == f"runs:/{run_id}/model"
    assert resolve_model_uri(f"models:/{NAME}@champion", uri) == f"models:/{NAME}@champion"
    assert resolve_model_uri(f"models:/{NAME}/1", uri) == f"models:/{NAME}/1"
    iris_dir = runs["iris_dir"]
    assert resolve_model_uri(str(iris_dir), uri) == str(iris_dir.resolve())
    keras_file = iris_dir / "model.keras"
    assert resolve_model_uri(str(keras_file), uri) == str(keras_file.resolve())
    with pytest.raises(DlpipeError, match="has no alias 'nope' .*champion"):
        resolve_model_uri(f"models:/{NAME}@nope", uri)
    with pytest.raises(DlpipeError, match="has no version 9 .*\\[1, 2\\]"):
        resolve_model_uri(f"models:/{NAME}/9", uri)
    with pytest.raises(DlpipeError, match="no registered model 'other'.*digits-lenet"):
        resolve_model_uri("models:/other@champion", uri)
    with pytest.raises(DlpipeError, match="no run 0123"):
        resolve_model_uri("0123456789abcdef0123456789abcdef", uri)
    with pytest.raises(DlpipeError, match="no model"):
        resolve_model_uri(str(runs["folder"] / "missing"), uri)


def test_load_predictor_from_the_registry(runs):
    from dlpipe.packaging import load_predictor

    predictor = load_predictor(f"models:/{NAME}@champion", runs["uri"])
    assert predictor.task == "classification"
    assert predictor.input_description["kind"] == "image"
    assert predictor.input_description["shape"] == [None, None, None, 1]
    out = predictor.predict(runs["raw_x"].astype("float32"))  # cast to the signature's dtype
    assert out["label"].tolist() == runs["expected"].argmax(axis=1).tolist()
    # Version 1 is still there, and is the first run's model.
    first = load_predictor(f"models:/{NAME}/1", runs["uri"]).predict(runs["raw_x"])
    assert first["probabilities"].shape == runs["expected"].shape


def test_latent_diffusion_source_accepts_a_registered_model(runs):
    import keras

    from dlpipe.models.latent_diffusion import SourceModel
    from dlpipe.models.latent_diffusion.model import load_source

    source = SourceModel(uri=f"models:/{NAME}@champion", tracking_uri=runs["uri"])
    model = load_source(source, None)
    assert isinstance(model, keras.Model)
    np.testing.assert_allclose(
        model.predict(runs["second"].data.x["test"], verbose=0), runs["expected"],
        rtol=1e-5, atol=1e-6,
    )


def test_register_is_validated(host):
    def check(tracking: str) -> SpecError:
        text = f"name: t\ntracking: {tracking}\nstages:\n  - {{kind: data, use: xor}}\n"
        with pytest.raises(SpecError) as info:
            validate(load_yaml(text, "t.yaml"), host.registry)
        return info.value

    assert "register.name" in str(check("{register: {name: a/b}}"))
    assert "register.alias" in str(check("{register: {name: a, alias: latest}}"))
    assert "register.alias" in str(check("{register: {name: a, alias: v2}}"))
    assert "needs log_model" in str(check("{register: {name: a}, log_model: false}"))
    ok = validate(load_yaml("name: t\ntracking: {register: {name: a.b-c, alias: champion}}\n"
                            "stages:\n  - {kind: data, use: xor}\n", "t.yaml"), host.registry)
    assert ok.settings.tracking.registration.name == "a.b-c"
    assert ok.resolved_dict()["tracking"]["register"] == {"name": "a.b-c", "alias": "champion"}


def test_packaging_imports_nothing_heavy(repo):
    code = ("import sys, dlpipe.packaging; "
            "print([m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=repo, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
