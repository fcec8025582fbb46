"""The tune stage: real Optuna studies of tiny VAEs, tracked in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dlpipe import Params, hookimpl
from dlpipe.cli import main
from dlpipe.engine import run_pipeline
from dlpipe.errors import SpecError
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, validate

SPEC = """\
name: tune-test
experiment: tune-tests
seed: 3
stages:
  - {kind: data, use: sklearn_digits, params: {limit: 400}}
  - {kind: model, use: vae, params: {hidden: [32], latent_dim: 2}}
  - kind: train
    use: keras_fit
    params:
      epochs: 2
      batch_size: 64
      optimizer: {learning_rate: 0.003}
      loss_weights: {kl: 1.0}
  - kind: tune
    use: optuna
    params:
%s
"""

BASIC = """\
space:
  train.optimizer.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  train.loss_weights.kl: {type: float, low: 0.5, high: 2.0}
objective: {metric: val_loss}
n_trials: 2
"""


def write_spec(path, tune_params: str):
    path.write_text(SPEC % textwrap.indent(tune_params, " " * 6))
    return str(path)


def load_study(name_prefix="tune-test"):
    import optuna

    from dlpipe.paths import home

    storage = f"sqlite:///{(home() / 'optuna.db').resolve()}"
    names = [n for n in optuna.study.get_all_study_names(storage) if n.startswith(name_prefix)]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def mlflow_runs(experiment="tune-tests"):
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# --------------------------------------------------------------------------------------
# Validation (no TensorFlow)
# --------------------------------------------------------------------------------------


def check(host, tune_params: str):
    doc = load_yaml(SPEC % textwrap.indent(tune_params, " " * 6), "t.yaml")
    return validate(doc, host.registry)


def problems_of(host, tune_params: str) -> str:
    with pytest.raises(SpecError) as info:
        check(host, tune_params)
    return str(info.value)


def test_a_valid_search_space_passes(host):
    spec = check(host, BASIC)
    assert spec.stages[-1].params.n_trials == 2


def test_unknown_path_is_named_with_close_matches(host):
    text = problems_of(host, BASIC.replace("learning_rate:", "learnin_rate:"))
    assert "t.yaml:" in text and "train.optimizer.learnin_rate" in text
    assert "did you mean: learning_rate" in text

    text = problems_of(host, BASIC.replace("train.loss_weights", "trian.loss_weights"))
    assert "trian.loss_weights.kl" in text and "did you mean: train" in text

    text = problems_of(host, BASIC.replace("loss_weights.kl", "loss_weights.kll"))
    assert "no loss term 'kll'" in text and "did you mean: kl" in text


def test_a_bad_distribution_names_the_path(host):
    text = problems_of(host, BASIC.replace("low: 0.5, high: 2.0", "low: 2.0, high: 0.5"))
    assert "train.loss_weights.kl" in text and "must be below high" in text

    text = problems_of(host, BASIC.replace("{type: float, low: 1.0e-3", "{type: flaot, low: 1.0e-3"))
    assert "train.optimizer.learning_rate" in text and "float" in text

    # A value the target parameter refuses: learning rates must be > 0.
    text = problems_of(host, BASIC.replace("low: 1.0e-3, high: 1.0e-2, log: true", "low: -1, high: 1"))
    assert "train.optimizer.learning_rate" in text and "greater than 0" in text


def test_paths_must_point_into_earlier_stages(host):
    text = problems_of(host, BASIC.replace("train.loss_weights.kl", "tune.n_trials"))
    assert "does not run before 'tune'" in text


def test_validate_reports_it_without_tensorflow(tmp_path, repo):
    path = write_spec(tmp_path / "bad.yaml", BASIC.replace("learning_rate:", "learnin_rate:"))
    code = (
        "import sys\nfrom dlpipe.cli import main\n"
        f"rc = main(['validate', {path!r}])\n"
        "print('RC', rc, 'TF', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert "RC 2 TF False" in out.stdout
    assert "learnin_rate" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_study_writes_a_child_run_per_trial_and_resumes(workdir, capsys):
    spec = write_spec(workdir / "t.yaml", BASIC + "refit: true\n")
    assert main(["run", spec]) == 0
    out = capsys.readouterr().out
    assert "new study" in out and "tune: best val_loss=" in out

    client, parents, children = mlflow_runs()
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        assert "train.optimizer.learning_rate" in child.data.params
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 2
    sampled = {c.data.params["train.optimizer.learning_rate"] for c in children}
    assert len(sampled) == 2  # each trial ran with its own value
    assert parent.data.metrics["trials_complete"] == 2
    assert "best.train.loss_weights.kl" in parent.data.tags
    assert parent.data.tags["dlpipe.refit_trial"] in {"0", "1"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/study.json", "tune/trials.csv"} <= artifacts
    # The refit model: the Keras file and the MLflow model around it.
    assert {"model/model.keras", "model/MLmodel"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "model")}

    # The same spec again resumes the study and adds its n_trials.
    assert main(["run", spec]) == 0
    out = capsys.readouterr().out
    assert "adding 2 trials to 2" in out
    study = load_study()
    assert len(study.trials) == 4
    assert all(t.state.name == "COMPLETE" for t in study.trials)


@pytest.mark.slow
def test_bad_learning_rates_get_pruned(workdir):
    spec = write_spec(workdir / "t.yaml", """\
space:
  train.optimizer.learning_rate: {type: categorical, choices: [0.005, 1.0e-9]}
objective: {metric: val_loss}
sampler: random
seed: 48  # draws good, good, good, bad, good (each trial seeded from it and its number)
pruner: median
startup_trials: 1
warmup_epochs: 0
n_trials: 5
""")
    assert main(["run", spec, "--set", "train.epochs=3"]) == 0
    study = load_study()
    assert len(study.trials) == 5
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.params, t.state.name) for t in study.trials]
    assert all(t.params["train.optimizer.learning_rate"] == 1.0e-9 for t in pruned)
    assert all(len(t.intermediate_values) < 3 for t in pruned)  # stopped early
    _, _, children = mlflow_runs()
    tagged = [c for c in children if c.data.tags.get("optuna.trial_state") == "PRUNED"]
    assert len(tagged) == len(pruned) and all(c.info.status == "FINISHED" for c in tagged)


@pytest.mark.slow
def test_a_nan_trial_fails_and_the_study_completes(workdir, capsys):
    spec = write_spec(workdir / "t.yaml", """\
space:
  train.optimizer.learning_rate: {type: categorical, choices: [0.003, 1.0e+30]}
objective: {metric: val_loss}
sampler: grid
n_trials: 2
""")
    assert main(["run", spec]) == 0
    out = capsys.readouterr().out
    study = load_study()
    states = {t.params["train.optimizer.learning_rate"]: t for t in study.trials}
    assert states[0.003].state.name == "COMPLETE"
    bad = states[1.0e30]
    assert bad.state.name == "FAIL"
    assert "became" in bad.user_attrs["dlpipe.error"]  # "loss became nan in epoch 1"
    assert "FAIL" in out and "1 failed" in out
    _, parents, children = mlflow_runs()
    failed = [c for c in children if c.data.tags.get("optuna.trial_state") == "FAIL"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_multi_objective_study_returns_a_pareto_front(workdir):
    spec = write_spec(workdir / "t.yaml", """\
space:
  train.loss_weights.kl: {type: float, low: 0.1, high: 5.0, log: true}
objective:
  - {metric: val_reconstruction_loss, direction: minimize}
  - {metric: val_kl_loss, direction: minimize}
n_trials: 3
""")
    assert main(["run", spec]) == 0
    study = load_study()
    assert len(study.directions) == 2 and len(study.trials) == 3
    front = study.best_trials
    assert front and all(len(t.values) == 2 for t in front)
    summary = json.loads(next(workdir.glob("mlruns/runs/*/tune/study.json")).read_text())
    assert {t["number"] for t in summary["pareto_front"]} == {t.number for t in front}
    client, parents, _ = mlflow_runs()
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "tune")}
    assert "tune/pareto_front.png" in artifacts


@pytest.mark.slow
def test_two_workers_share_exactly_n_trials(workdir):
    spec = write_spec(workdir / "t.yaml", BASIC.replace("n_trials: 2", "n_trials: 5"))
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe", "run", spec, "--workers", "2", "--set", "train.epochs=3"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load_study()
    assert len(study.trials) == 5
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    workers = {t.user_attrs["dlpipe.worker"] for t in study.trials}
    assert workers == {0, 1}, proc.stdout
    _, parents, children = mlflow_runs()
    assert len(parents) == 1 and len(children) == 5  # the worker's trials nest in one run
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_retried(workdir):
    """Two `dlpipe run` processes share a study; one is SIGKILLed mid-trial. The other
    sees its heartbeat stop, marks that trial failed, runs it again and completes."""
    import signal
    import time

    import optuna
    import sqlalchemy

    spec = write_spec(workdir / "t.yaml", BASIC.replace("n_trials: 2", """n_trials: 3
heartbeat_interval: 1
grace_period: 4"""))
    cmd = [sys.executable, "-m", "dlpipe", "run", spec, "--set", "train.epochs=8", "--no-track"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivor = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed = None
        deadline = time.time() + 180
        while killed is None and time.time() < deadline:
            time.sleep(0.5)
            try:
                study = load_study()
            except (AssertionError, KeyError, optuna.exceptions.StorageInternalError,
                    sqlalchemy.exc.OperationalError):  # mlruns/ or the study not there yet
                continue
            for t in study.get_trials(deepcopy=False):
                if t.state.name == "RUNNING" and t.user_attrs.get("dlpipe.pid") == victim.pid:
                    victim.send_signal(signal.SIGKILL)
                    killed = t.number
        assert killed is not None, "the victim never ran a trial"
        out, _ = survivor.communicate(timeout=300)
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.kill()
    assert survivor.returncode == 0, out[-3000:]
    trials = load_study().trials
    by_state = {}
    for t in trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert [t.number for t in by_state["FAIL"]] == [killed]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert len(by_state["COMPLETE"]) == 3  # the budget, with the killed trial run again


class Featurizer:
    """A plugin's own kind that prepares data (``provides: data``); counts its runs."""

    __name__ = "featurizer"

    class P(Params):
        scale: float = 1.0

    def __init__(self):
        self.runs = 0

    @hookimpl
    def register_stages(self, register):
        def featurize(ctx, params):
            self.runs += 1

        register("featurize", "scale", featurize, self.P, "Counts its runs.",
                 needs=("data",), provides=("data",))


PREPARED = """\
name: tune-prepared
experiment: tune-tests
seed: 1
tracking: {enabled: false}
stages:
  - {kind: data, use: xor, params: {repeats: 4}}
  - {kind: featurize, use: scale}
  - {kind: model, use: mlp, params: {hidden: [4]}}
  - {kind: train, use: keras_fit, params: {epochs: 1, batch_size: 16}}
  - kind: tune
    use: optuna
    params:
      space: {%s: {type: float, low: 0.01, high: 0.1}}
      objective: {metric: val_loss}
      n_trials: 2
"""


@pytest.mark.slow
@pytest.mark.parametrize(("path", "runs"), [
    ("train.optimizer.learning_rate", 1),  # prepared once, like a data stage
    ("featurize.scale", 2),  # the space writes into it: once per trial
])
def test_a_plugin_stage_that_prepares_data_runs_once(workdir, path, runs):
    plugin = Featurizer()
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[plugin])
    spec = validate(load_yaml(PREPARED % path, "p.yaml"), host.registry)
    run_pipeline(spec, host)
    assert len(load_study("tune-prepared").trials) == 2
    assert plugin.runs == runs
