"""What the user sees: no TensorFlow start-up noise, and a study that is easy to find
in Optuna's dashboard and in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dlpipe.cli import main

#: Lines TensorFlow prints while it loads (see dlpipe.startup.startup_noise).
NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "cudart_stub.cc",
    "failed call to cuInit",
    "To enable the following instructions",
    "cpu_feature_guard.cc",
)


def noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


# --------------------------------------------------------------------------------------
# TensorFlow's start-up lines
# --------------------------------------------------------------------------------------

FAKE_IMPORT = r"""
import os, sys
from dlpipe.startup import filtered_stderr, startup_noise
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
with filtered_stderr(startup_noise()):
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1795801774.376232   23194 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"W0000 00:00:1795801774.376232   23194 some.cc:1] a warning below the level\n")
    os.write(2, b"E0000 00:00:1795801788.316286   23194 some.cc:9] a real error\n")
    os.write(2, b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.\n")
    print("python's own stderr line", file=sys.stderr)
    os.write(2, b"a line without a newline")
print("after", file=sys.stderr, flush=True)
"""


def test_startup_filter_drops_only_known_noise(repo):
    out = subprocess.run([sys.executable, "-c", FAKE_IMPORT], capture_output=True, text=True,
                         cwd=repo, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "E0000 00:00:1795801788.316286   23194 some.cc:9] a real error",
        "python's own stderr line",
        "a line without a newline" "after",  # passed on as written
    ]


def test_a_crash_while_loading_still_shows_why(repo):
    """The filter is its own process: a hard crash in the block cannot swallow the reason."""
    code = ("import os\nfrom dlpipe.startup import filtered_stderr\n"
            "with filtered_stderr('noise'):\n"
            "    os.write(2, b'noise\\nF0000 cpu_feature_guard.cc] this CPU lacks AVX\\n')\n"
            "    os.abort()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=repo, timeout=60)
    assert out.returncode != 0
    assert out.stderr.splitlines() == ["F0000 cpu_feature_guard.cc] this CPU lacks AVX"]


@pytest.mark.slow
def test_a_run_prints_no_tensorflow_startup_lines(repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DLPIPE_DEBUG")}
    out = subprocess.run(
        [sys.executable, "-m", "dlpipe", "run", str(repo / "pipelines" / "xor.yaml"),
         "--set", "train.epochs=1", "--no-track"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert noise_in(out.stdout + out.stderr) == []
    assert out.stdout.startswith("dlpipe: running xor")

    # DLPIPE_DEBUG=1 (dlpipe --debug) shows them.
    code = "from dlpipe.engine import configure_backend\nconfigure_backend(0)\n"
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=repo, env={**env, "DLPIPE_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 0, debug.stderr[-3000:]
    if not noise_in(debug.stderr):
        pytest.skip("TensorFlow prints nothing at start-up on this machine")


# --------------------------------------------------------------------------------------
# A study as Optuna's dashboard and MLflow show it
# --------------------------------------------------------------------------------------

def test_the_dashboard_command_hides_passwords_and_says_how_to_install(monkeypatch):
    import importlib.util

    from dlpipe.stages.tune import report

    assert report.dashboard_command("postgresql://me:secret@db/optuna") == (
        "optuna-dashboard 'postgresql://me:***@db/optuna'")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert report.dashboard_hint("sqlite:////x/optuna.db") == (
        "`optuna-dashboard sqlite:////x/optuna.db` (pip install optuna-dashboard)")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert report.dashboard_hint("sqlite:////x/optuna.db") == "`optuna-dashboard sqlite:////x/optuna.db`"


SPEC = """\
name: tune-ux
experiment: tune-ux
seed: 1
stages:
  - {kind: data, use: xor, params: {repeats: 8}}
  - {kind: model, use: mlp, params: {hidden: [4], activation: tanh}}
  - kind: train
    use: keras_fit
    params: {epochs: 2, batch_size: 16, optimizer: {learning_rate: 0.02}}
  - kind: tune
    use: optuna
    params:
      space:
        train.optimizer.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
        model.hidden: {type: categorical, choices: [[4], [8]]}
      objective: {metric: val_accuracy, direction: maximize}
      n_trials: 2
"""


@pytest.mark.slow
def test_a_study_links_optuna_and_mlflow(workdir, capsys):
    import optuna
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri, home

    (workdir / "t.yaml").write_text(textwrap.dedent(SPEC))
    assert main(["run", "t.yaml"]) == 0
    out = capsys.readouterr().out

    storage = f"sqlite:///{(home() / 'optuna.db').resolve()}"
    (name,) = optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    # The dashboard names the objective instead of "Objective 0".
    assert study.metric_names == ["val_accuracy"]
    # How to open it, at the start and at the end.
    assert f"tune: watch it live with `optuna-dashboard {storage}`" in out
    assert f"tune: study {name!r}; browse it with `optuna-dashboard {storage}`" in out

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("tune-ux")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(children) == 2

    # Each trial names its MLflow run; each child run names its trial.
    for trial in study.trials:
        child = children[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["optuna.trial"] == str(trial.number)
        assert child.data.tags["optuna.study"] == name

    # The study's run shows the best values beside the spec's untuned ones.
    best = study.best_trial
    metrics, tags = parent.data.metrics, parent.data.tags
    learning_rate = best.params["train.optimizer.learning_rate"]
    assert metrics["best.train.optimizer.learning_rate"] == pytest.approx(learning_rate)
    assert metrics["best_trial"] == best.number
    assert tags["best.model.hidden"] == str(optuna_choice(best.params["model.hidden"]))
    assert tags["optuna.best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.params["train.optimizer.learning_rate"] == "0.02"  # the spec's


def optuna_choice(value):
    """A categorical choice as the tune stage stores it (lists travel as JSON text)."""
    from dlpipe.stages.tune.trial import decode

    return decode(value)
