"""``strategy: multi_worker``: two worker processes on 127.0.0.1 (``dlpipe run
--local-workers 2``) train an MLP (xor) and a VAE (custom ``train_step``) to the very
weights single-process MirroredStrategy over two logical CPUs reaches; only the chief
tracks; a killed worker stops the other with a clear error; a re-launch resumes.

The end-to-end test runs three commands at once to fit a small CPU budget: the
mirrored reference, then the two-worker run whose chief is killed (SIGKILL) in the
MLP's second epoch, then its re-launch, which resumes and finishes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlpipe.errors import DlpipeError
from dlpipe.strategies import MultiWorkerParams, keras_mwms, launch
from dlpipe.strategies.multi_worker import cluster_from

SPEC = """\
name: mw
experiment: multi-worker
seed: 3
strategy: multi_worker
tracking: {export: false}
plugins: [probe.py]
stages:
  - {kind: data, name: xor, use: xor, params: {repeats: 20, val_fraction: 0.2, test_fraction: 0.2}}
  - {kind: model, name: mlp, use: mlp, params: {hidden: [4], activation: tanh, dropout: 0.0}}
  - kind: train
    name: train_mlp
    use: keras_fit
    params: {epochs: 3, batch_size: 10, verbose: 0, checkpoint: {every_seconds: 0.01},
             optimizer: {name: adam, learning_rate: 0.02}}
  - kind: data
    name: digits
    use: sklearn_digits
    params: {limit: 200, val_fraction: 0.1, test_fraction: 0.1, normalize: minmax,
             value_range: [0, 1]}
  - {kind: model, name: vae, use: vae, params: {latent_dim: 2, hidden: [16]}}
  - kind: train
    name: train_vae
    use: keras_fit
    params: {epochs: 2, batch_size: 16, verbose: 0, optimizer: {name: adam, learning_rate: 0.003}}
  - {kind: evaluate, use: keras_evaluate, params: {plots: false}}
"""

# Loaded by every process: writes each trained model's weights per worker, and kills
# the chief once, in the MLP's second epoch (before that epoch's snapshot).
PROBE = """\
import os, signal
import numpy as np
from dlpipe import hookimpl

@hookimpl
def on_metrics(context, stage, metrics, step):
    flag = os.environ.get("MW_KILL_FLAG")
    if flag and step == 1 and "train_mlp/loss" in metrics and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

@hookimpl
def after_run(context):
    who = os.environ.get("DLPIPE_LOCAL_WORKER", "single")
    for stage, model in context.models.items():
        np.savez(os.path.join(os.environ["MW_DUMP"], f"{stage}-{who}.npz"), *model.get_weights())
"""


def _loopback_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        return True
    except OSError:
        return False


def _env(home: Path, dump: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DLPIPE_HOME": str(home), "MW_DUMP": str(dump), **extra}
    for key in ("MLFLOW_TRACKING_URI", "TF_CONFIG", launch.CHILD_ENV):
        env.pop(key, None)
    return env


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dlpipe", "run", "spec.yaml", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _weights(dump: Path, stage: str, who: str) -> list[np.ndarray]:
    with np.load(dump / f"{stage}-{who}.npz") as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.mark.slow
@pytest.mark.skipif(find_spec("tensorflow") is None, reason="TensorFlow is not installed")
@pytest.mark.skipif(not _loopback_works(), reason="multi-process TensorFlow needs TCP on "
                    "127.0.0.1, which this machine does not allow")
def test_two_local_workers_match_mirrored_stop_on_a_dead_worker_and_resume(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "probe.py").write_text(PROBE)
    home, dump = tmp_path / "mlruns", tmp_path / "dump"
    dump.mkdir()
    kill_flag = tmp_path / "killed"

    reference = _start(["--no-track", "--set",
                        "strategy={use: mirrored, params: {logical_cpus: 2}}"],
                       tmp_path, _env(home, dump))
    # 1. The chief dies in the MLP's second epoch: worker 1 must stop on its own, soon.
    first = _start(["--local-workers", "2"], tmp_path,
                   _env(home, dump, MW_KILL_FLAG=str(kill_flag)))
    assert first.stdout is not None
    lines, died_at = [], None
    for line in first.stdout:
        lines.append(line)
        if died_at is None and line.startswith("dlpipe: worker 0 failed (signal 9)"):
            died_at = time.monotonic()
    first.wait(timeout=60)
    out = "".join(lines)
    if "multi_worker over 2 workers" not in out and "Address already in use" in out:
        pytest.skip("the workers could not listen on 127.0.0.1")
    assert died_at is not None, out[-3000:]
    stopped_in = time.monotonic() - died_at
    assert first.returncode == 137, out[-3000:]
    assert "[worker 1] error: worker 1 of 2: lost contact with the other workers" in out
    assert "stopping the workers still running" not in out  # it stopped by itself
    assert stopped_in < 50, f"worker 1 took {stopped_in:.0f} s to stop"

    # 2. The re-launch resumes both workers from the chief's snapshot and finishes.
    second = _start(["--local-workers", "2"], tmp_path,
                    _env(home, dump, MW_KILL_FLAG=str(kill_flag)))
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out2[-4000:]
    for worker in (0, 1):
        assert f"[worker {worker}] train: resuming from " in out2
        assert "after epoch 1 of 3" in out2
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]

    # Both workers hold the mirrored run's weights, to the bit.
    for stage in ("mlp", "vae"):
        single = _weights(dump, stage, "single")
        for worker in ("0", "1"):
            got = _weights(dump, stage, worker)
            assert len(got) == len(single)
            for a, b in zip(got, single, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{stage}, worker {worker}")

    # Only the chief tracked: one MLflow run, each epoch logged once, one model.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(home / 'mlflow.db').as_posix()}")
    experiment = client.get_experiment_by_name("multi-worker")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_vae/loss")] == [0, 1]
    assert {m.step for m in client.get_metric_history(run_id, "train_mlp/loss")} == {0, 1, 2}
    assert "test_loss" in runs[0].data.metrics
    assert "model" in [a.path for a in client.list_artifacts(run_id)]
    run_dirs = [p for p in (home / "runs").iterdir() if (p / "model").is_dir()]
    chief_dir = next(p for p in run_dirs if (p / "spec").is_dir())  # the tracked one
    assert (chief_dir / "model" / "model.keras").is_file()
    assert not (chief_dir / "workers").exists()  # worker 1's scratch folder is gone
    assert not (chief_dir / "backup-train_mlp").exists()  # finished: resume state removed


# ---------------------------------------------------------------------------------------
# Cheap checks, no TensorFlow
# ---------------------------------------------------------------------------------------


def test_the_cluster_comes_from_params_or_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DlpipeError, match="no cluster is configured.*--local-workers"):
        cluster_from(MultiWorkerParams())
    params = MultiWorkerParams(workers=["a:1", "b:2", "c:3"], index=2)
    assert cluster_from(params).worker_name == "worker-2"
    assert "workers" not in params.model_dump()  # who runs it is not the run's identity
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0},
    }))
    cluster = cluster_from(MultiWorkerParams())
    assert (cluster.is_chief, cluster.size, cluster.worker_name) == (False, 2, "worker-0")
    monkeypatch.setenv("TF_CONFIG", launch.tf_config([5000, 5001], 0))
    assert cluster_from(MultiWorkerParams()).is_chief
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, '
                       '"task": {"type": "worker", "index": 0}}')
    with pytest.raises(DlpipeError, match="chief and worker tasks only"):
        cluster_from(MultiWorkerParams())
    with pytest.raises(ValueError, match="go together"):
        MultiWorkerParams(index=1)


def test_is_chief_follows_the_cluster_resolver(monkeypatch):
    from dlpipe.context import RunContext

    def resolver(task_type, task_id, jobs):
        return SimpleNamespace(task_type=task_type, task_id=task_id,
                               cluster_spec=lambda: SimpleNamespace(as_dict=lambda: jobs))

    def ctx(strategy=None, params=None):
        spec = SimpleNamespace(strategy_params=params or MultiWorkerParams(
            workers=["a:1", "b:2"], index=1))
        return RunContext(spec=spec, plugins=None, run_dir=Path("."), strategy=strategy)  # type: ignore[arg-type]

    workers = {"worker": ["a:1", "b:2"]}
    assert not ctx().is_chief  # before the strategy: from the params
    assert ctx(params=MultiWorkerParams(workers=["a:1", "b:2"], index=0)).is_chief
    assert ctx(SimpleNamespace(cluster_resolver=None)).is_chief  # no cluster
    assert ctx(SimpleNamespace(cluster_resolver=resolver("worker", 0, workers))).is_chief
    assert not ctx(SimpleNamespace(cluster_resolver=resolver("worker", 1, workers))).is_chief
    with_chief = {"chief": ["c:0"], **workers}
    assert not ctx(SimpleNamespace(cluster_resolver=resolver("worker", 0, with_chief))).is_chief
    assert ctx(SimpleNamespace(cluster_resolver=resolver("chief", 0, with_chief))).is_chief


def test_untested_keras_versions_are_refused_with_the_issue(monkeypatch):
    monkeypatch.delenv(keras_mwms.UNTESTED_ENV, raising=False)
    keras_mwms.check_version(keras_mwms.TESTED_KERAS[0])
    with pytest.raises(DlpipeError) as refused:
        keras_mwms.check_version("3.99.0")
    for part in ("Keras 3.99.0 is installed", "tested with Keras 3.15.1 only",
                 "keras-team/keras/issues/20585", keras_mwms.UNTESTED_ENV):
        assert part in str(refused.value)
    monkeypatch.setenv(keras_mwms.UNTESTED_ENV, "1")
    keras_mwms.check_version("3.99.0")


def test_local_workers_need_the_multi_worker_strategy():
    spec = SimpleNamespace(strategy_name="mirrored", source="x.yaml", strategy_params=None)
    with pytest.raises(DlpipeError, match="--set strategy=multi_worker"):
        launch.check_spec(spec, 2)
    spec = SimpleNamespace(strategy_name="multi_worker", source="x.yaml",
                           strategy_params=MultiWorkerParams(workers=["a:1"], index=0))
    with pytest.raises(DlpipeError, match="sets the cluster itself"):
        launch.check_spec(spec, 2)
    assert len(set(launch.free_ports(3))) == 3
