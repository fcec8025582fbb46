"""Real pipeline runs on CPU: MLflow records, artifacts, failures, lifecycle hooks."""

from __future__ import annotations

import numpy as np
import pytest

from dlpipe import Params, hookimpl
from dlpipe.cli import main
from dlpipe.engine import run_pipeline
from dlpipe.errors import TrainingDiverged
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, validate

pytestmark = pytest.mark.slow

TINY = """\
name: tiny
experiment: tests
seed: 1
tracking: {enabled: %(track)s}
stages:
  - {kind: data, use: sklearn_digits, params: {limit: 300}}
  - {kind: model, use: vae, params: {hidden: [32], latent_dim: 2}}
  - {kind: train, use: keras_fit, params: {epochs: 2, batch_size: 64, verbose: 0}}
  - {kind: %(last_kind)s, use: %(last_use)s}
"""


def tiny_spec(host, track="true", last_kind="evaluate", last_use="keras_evaluate"):
    doc = load_yaml(TINY % {"track": track, "last_kind": last_kind, "last_use": last_use}, "tiny.yaml")
    return validate(doc, host.registry)


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    return MlflowClient(default_tracking_uri())


def only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_vae_pipeline_end_to_end(workdir, repo, capsys):
    import keras

    rc = main(["run", str(repo / "pipelines" / "vae.yaml"), "--set", "train.epochs=6"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FINISHED" in out and "test_loss" in out

    client = mlflow_client()
    run = only_run(client, "dlpipe-vae")
    assert run.info.status == "FINISHED"
    # params: the flattened resolved spec, in --set syntax
    assert run.data.params["train.epochs"] == "6"
    assert run.data.params["model.latent_dim"] == "2"
    assert run.data.params["train.optimizer.learning_rate"] == "0.003"
    # tags: spec file, versions, plugins
    tags = run.data.tags
    assert tags["dlpipe.spec_file"].endswith("vae.yaml")
    assert tags["version.tensorflow"] and tags["version.keras"].startswith("3.")
    assert "plugin.dlpipe.vae" in tags
    # every epoch's metrics, and the loss falls
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(6))
    assert history[-1].value < history[0].value
    for key in ("val_loss", "kl_loss", "reconstruction_loss", "learning_rate"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 6
    assert "test_loss" in run.data.metrics
    # artifacts: plots, spec and a model that reloads and reconstructs
    names = {a.path for folder in ("plots", "model", "spec")
             for a in client.list_artifacts(run.info.run_id, folder)}
    assert {
        "plots/learning_curves.png", "plots/latent_manifold.png",
        "plots/reconstructions.png", "plots/latent_scatter.png",
        "model/model.keras", "spec/resolved.yaml", "spec/vae.yaml",
    } <= names
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    from sklearn.datasets import load_digits

    x = (load_digits().images[:200] / 16.0).astype("float32")[..., None]
    recon = np.asarray(model.predict(x, verbose=0))
    assert recon.shape == x.shape
    mse_model = float(np.mean((recon - x) ** 2))
    mse_mean_image = float(np.mean((x.mean(axis=0) - x) ** 2))
    assert mse_model < mse_mean_image


class Recorder:
    """Implements every lifecycle hook and records the calls."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    @hookimpl
    def before_run(self, context):
        self.calls.append(("before_run",))

    @hookimpl
    def after_run(self, context):
        self.calls.append(("after_run",))

    @hookimpl
    def on_run_error(self, context, error):
        self.calls.append(("on_run_error", type(error).__name__))

    @hookimpl
    def before_stage(self, context, stage):
        self.calls.append(("before_stage", stage.id))

    @hookimpl
    def after_stage(self, context, stage):
        self.calls.append(("after_stage", stage.id))

    @hookimpl
    def on_stage_error(self, context, stage, error):
        self.calls.append(("on_stage_error", stage.id, str(error)))

    @hookimpl
    def on_metrics(self, context, stage, metrics, step):
        self.calls.append(("on_metrics", stage.id, step, "loss" in metrics or "test_loss" in metrics))

    @hookimpl
    def on_artifact(self, context, stage, path, artifact_path):
        self.calls.append(("on_artifact", stage.id, artifact_path, path.rsplit("/", 1)[-1]))


class Boom(Params):
    message: str = "boom"


class Failing:
    __name__ = "failing"

    @hookimpl
    def register_stages(self, register):
        def explode(ctx, params):
            raise RuntimeError(params.message)

        register("evaluate", "explode", explode, Boom)


def test_lifecycle_hooks_in_order(workdir):
    recorder = Recorder()
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[recorder])
    run_pipeline(tiny_spec(host, track="false"), host)
    calls = recorder.calls
    assert calls[0] == ("before_run",) and calls[-1] == ("after_run",)
    stage_calls = [c for c in calls if c[0] in ("before_stage", "after_stage")]
    assert stage_calls == [
        (kind, sid) for sid in ("data", "model", "train", "evaluate")
        for kind in ("before_stage", "after_stage")
    ]
    epochs = [c for c in calls if c[0] == "on_metrics" and c[1] == "train"]
    assert [c[2] for c in epochs] == [0, 1] and all(c[3] for c in epochs)
    assert ("on_metrics", "evaluate", None, True) in calls
    assert ("on_artifact", "train", "model", "model.keras") in calls
    assert ("on_artifact", "evaluate", "plots", "learning_curves.png") in calls
    assert not [c for c in calls if c[0] in ("on_run_error", "on_stage_error")]


def test_failure_marks_run_failed_and_keeps_checkpoints(workdir):
    recorder = Recorder()
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[recorder, Failing()])
    spec = tiny_spec(host, last_use="explode")
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(spec, host)
    assert recorder.calls[-2:] == [
        ("on_stage_error", "evaluate", "boom"),
        ("on_run_error", "RuntimeError"),
    ]
    run = only_run(mlflow_client(), "tests")
    assert run.info.status == "FAILED"
    assert run.data.tags["dlpipe.error"] == "RuntimeError: boom"
    checkpoints = list((workdir / "mlruns" / "runs").glob("tiny-*/checkpoints/best.weights.h5"))
    assert len(checkpoints) == 1


def test_cli_failure_is_clear_without_traceback(workdir, capsys):
    (workdir / "failing_plugin.py").write_text(
        "from dlpipe import hookimpl\n"
        "def explode(ctx, params):\n"
        "    raise RuntimeError('the evaluation exploded')\n"
        "@hookimpl\n"
        "def register_stages(register):\n"
        "    register('evaluate', 'explode', explode)\n"
    )
    spec = TINY % {"track": "true", "last_kind": "evaluate", "last_use": "explode"}
    (workdir / "p.yaml").write_text("plugins: [failing_plugin.py]\n" + spec)
    rc = main(["run", "p.yaml"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: RuntimeError: the evaluation exploded" in err and "Traceback" not in err
    assert only_run(mlflow_client(), "tests").info.status == "FAILED"


def test_nan_guard_fails_the_run(monkeypatch, workdir):
    # The data stages refuse NaN input; let one through to reach the training guard.
    monkeypatch.setattr("dlpipe.datacheck.check_arrays", lambda *a, **k: None)
    x = np.random.default_rng(0).random((120, 8, 8, 1)).astype("float32")
    x[5, 0, 0, 0] = np.nan
    np.savez(workdir / "bad.npz", x=x, y=np.zeros(120, dtype="int32"))
    text = TINY % {"track": "true", "last_kind": "evaluate", "last_use": "keras_evaluate"}
    text = text.replace(
        "use: sklearn_digits, params: {limit: 300}",
        "use: npz, params: {path: bad.npz, task: unsupervised, normalize: none}",
    )
    host = load_plugins(plugin_dirs=[], entry_points=False)
    spec = validate(load_yaml(text, "nan.yaml"), host.registry)
    with pytest.raises(TrainingDiverged, match=r"loss became nan in epoch 1"):
        run_pipeline(spec, host)
    run = only_run(mlflow_client(), "tests")
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["dlpipe.error"]


class CountingStrategy:
    """A strategy plugin: register_strategies with params, used via `strategy:`."""

    __name__ = "counting"

    class P(Params):
        label: str = "x"

    def __init__(self):
        self.created = []

    @hookimpl
    def register_strategies(self, register):
        def create(params):
            import tensorflow as tf

            self.created.append(params.label)
            return tf.distribute.get_strategy()

        register("counting", create, self.P, "default strategy, counted")


def test_strategy_plugin_is_used(workdir):
    plugin = CountingStrategy()
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[plugin])
    text = (TINY % {"track": "false", "last_kind": "evaluate", "last_use": "keras_evaluate"})
    text = text.replace("seed: 1", "seed: 1\nstrategy: {use: counting, params: {label: hi}}")
    spec = validate(load_yaml(text, "s.yaml"), host.registry)
    ctx = run_pipeline(spec, host)
    assert plugin.created == ["hi"] and ctx.model is not None


class StopAtEpoch:
    """Simulates a killed run: raises from on_metrics at a given epoch."""

    __name__ = "stopper"

    def __init__(self, epoch):
        self.epoch = epoch

    @hookimpl
    def on_metrics(self, context, stage, metrics, step):
        if step == self.epoch:
            raise KeyboardInterrupt


def test_rerun_of_an_interrupted_run_resumes(workdir):
    text = (TINY % {"track": "true", "last_kind": "evaluate", "last_use": "keras_evaluate"})
    # A snapshot after every epoch (the default, every 10 s, would keep none this early).
    text = text.replace("epochs: 2", "epochs: 4, checkpoint: {every_seconds: 0}")
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[StopAtEpoch(2)])
    spec = validate(load_yaml(text, "r.yaml"), host.registry)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, host)
    host = load_plugins(plugin_dirs=[], entry_points=False)
    run_pipeline(validate(load_yaml(text, "r.yaml"), host.registry), host)

    client = mlflow_client()
    exp = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([exp.experiment_id])  # one run: the re-run continued it
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    # Epochs 0 and 1 from the first process, 2 and 3 from the second (epoch 2 was
    # interrupted before its checkpoint, so it was trained again), not 0..3 twice.
    assert sorted(set(steps)) == [0, 1, 2, 3] and steps.count(0) == 1 and steps.count(1) == 1


def test_dropped_in_plugin_runs_from_a_spec(workdir, repo, capsys):
    """plugins/digit_mlp.py is picked up from ./plugins and used by its pipeline."""
    import shutil

    shutil.copytree(repo / "plugins", workdir / "plugins")
    shutil.copytree(repo / "pipelines", workdir / "pipelines")
    assert main(["plugins"]) == 0
    assert "models:     digit_mlp" in capsys.readouterr().out
    assert main(["run", "pipelines/digit_mlp.yaml", "--set", "train.epochs=3"]) == 0
    client = mlflow_client()
    run = only_run(client, "dlpipe-examples")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] > 0.5
    assert run.data.tags["plugin.digit_mlp"] == "0.1.0 (plugins-dir)"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/learning_curves.png"} <= plots


def test_broken_tracking_store_is_a_clear_error(workdir, capsys):
    text = TINY % {"track": "true", "last_kind": "evaluate", "last_use": "keras_evaluate"}
    text = text.replace("tracking: {enabled: true}", "tracking: {uri: 'nosuchscheme://x'}")
    (workdir / "t.yaml").write_text(text)
    assert main(["run", "t.yaml"]) == 2
    err = capsys.readouterr().err
    assert "MLflow tracking failed (nosuchscheme://x)" in err and "--no-track" in err
    assert "Traceback" not in err


def test_kill_9_leaves_no_run_running(workdir, repo):
    """Even a SIGKILLed training process gets its run closed (by the tracking sidecar)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "run", str(repo / "pipelines" / "vae.yaml"),
         "--set", "train.epochs=500", "--set", "train.early_stopping=null"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120
        seen_run = False
        for line in proc.stdout:
            seen_run = seen_run or line.startswith("mlflow: tracking run")
            if (seen_run and line.startswith("Epoch ")) or time.time() > deadline:
                break
        assert seen_run
        client = mlflow_client()
        run = only_run(client, "dlpipe-vae")
        assert run.info.status == "RUNNING"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    status = None
    for _ in range(40):
        status = client.get_run(run.info.run_id).info.status
        if status != "RUNNING":
            break
        time.sleep(0.5)
    assert status == "KILLED"
    assert client.get_run(run.info.run_id).data.tags["dlpipe.error"] == "the training process died"
