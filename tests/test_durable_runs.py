"""Durable runs: resume restores everything, damaged backups are never trusted or
overwritten, interrupts during a checkpoint write end KILLED, a full disk is a clear
error, and exploding losses stop the run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlpipe import hookimpl
from dlpipe.checkpoint import BackupFolder
from dlpipe.cli import main
from dlpipe.engine import run_dir_for, run_pipeline
from dlpipe.errors import TrainingDiverged
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, validate

pytestmark = pytest.mark.slow

SPEC = """\
name: durable
experiment: tests
seed: 3
tracking: {enabled: %(track)s}
stages:
  - {kind: data, use: sklearn_iris}
  - {kind: model, use: mlp, params: {hidden: [8], dropout: 0.2}}
  - kind: train
    use: keras_fit
    params:
      epochs: %(epochs)d
      batch_size: 16
      verbose: 0
      restore_best: true
      checkpoint: {every_seconds: 0}
      early_stopping: {patience: 4, monitor: val_loss, restore_best_weights: true}
  - {kind: evaluate, use: keras_evaluate}
"""


def spec_text(epochs: int = 8, track: bool = False) -> str:
    return SPEC % {"epochs": epochs, "track": "true" if track else "false"}


class Interrupt:
    """Stands in for a kill: raises KeyboardInterrupt when epoch ``epoch`` reports its
    metrics (before that epoch is checkpointed), or before stage ``stage`` starts."""

    __name__ = "interrupt"

    def __init__(self, epoch: int | None = None, stage: str | None = None) -> None:
        self.epoch, self.stage = epoch, stage

    @hookimpl
    def on_metrics(self, context, stage, metrics, step):
        if self.epoch is not None and step == self.epoch:
            raise KeyboardInterrupt

    @hookimpl
    def before_stage(self, context, stage):
        if stage.kind == self.stage:
            raise KeyboardInterrupt


def run(text: str, *extra):
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=list(extra))
    return run_pipeline(validate(load_yaml(text, "durable.yaml"), host.registry), host)


def resolved(text: str):
    host = load_plugins(plugin_dirs=[], entry_points=False)
    return validate(load_yaml(text, "durable.yaml"), host.registry)


def weights_digest(model) -> str:
    blob = b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())
    return hashlib.sha256(blob).hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def deterministic():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    yield


# --------------------------------------------------------------------------------------
# Resume restores everything fit had
# --------------------------------------------------------------------------------------


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(workdir, deterministic):
    # Best val_loss in epoch 15, early stop in epoch 19: killed in epoch 17, the
    # resumed run must remember both the best-so-far and the patience already used.
    text = spec_text(epochs=40).replace(
        "batch_size: 16", "batch_size: 16\n      optimizer: {learning_rate: 0.1}")
    reference = run(text)
    assert reference.metrics["best_epoch"] == 15 and len(reference.history["loss"]) == 19
    ref_weights, ref_history = weights_digest(reference.model), reference.history
    ref_metrics = dict(reference.metrics)

    os.rename(workdir / "mlruns", workdir / "mlruns-reference")
    with pytest.raises(KeyboardInterrupt):
        run(text, Interrupt(epoch=16))
    backup = BackupFolder(run_dir_for(resolved(text)) / "backup")
    assert backup.load(40).epoch == 16  # epochs 1..16 were checkpointed; epoch 17 was not
    resumed = run(text)

    assert weights_digest(resumed.model) == ref_weights
    timing = "epoch_time_s"
    assert {k: v for k, v in resumed.history.items() if k != timing} == {
        k: v for k, v in ref_history.items() if k != timing}  # the whole curve, both segments
    assert resumed.metrics == ref_metrics  # best epoch, best value, test metrics
    assert not backup.folder.exists()  # the run finished: nothing is left to resume


def test_a_run_killed_after_training_is_not_trained_again(workdir, capsys):
    text = spec_text(epochs=6)
    with pytest.raises(KeyboardInterrupt):
        run(text, Interrupt(stage="evaluate"))
    trained = capsys.readouterr().out
    ctx = run(text)
    out = capsys.readouterr().out
    assert "training finished in an earlier run (6 epochs" in out
    assert "not training again" in out
    assert len(ctx.history["loss"]) == 6 and "test_loss" in ctx.metrics
    assert "restored the best weights" in trained


# --------------------------------------------------------------------------------------
# Damaged backups: named, never overwritten, two ways out
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_once(tmp_path_factory):
    """A run folder left by a run interrupted in epoch 5 of 8 (snapshots after epochs 3
    and 4), made once; each test gets its own copy of it."""
    folder = tmp_path_factory.mktemp("interrupted")
    old = Path.cwd()
    os.chdir(folder)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(spec_text(epochs=8), Interrupt(epoch=4))
    finally:
        os.chdir(old)
    return folder / "mlruns"


def _interrupted(workdir: Path, made: Path) -> tuple[str, BackupFolder]:
    text = spec_text(epochs=8)
    (workdir / "durable.yaml").write_text(text)
    shutil.copytree(made, workdir / "mlruns")
    return text, BackupFolder(run_dir_for(resolved(text)) / "backup")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", "weights.weights.h5 (epoch 4) has 0 bytes, expected"),
        ("flip", "weights.weights.h5 (epoch 4) does not match its checksum"),
        ("delete", "weights.weights.h5 (epoch 4) is missing"),
        ("epoch=999", "state.json says epoch 999, which is not between 0 and the 8 epochs"),
        ("epoch=-3", "state.json says epoch -3, which is not between 0 and the 8 epochs"),
        ("json", "state.json is unreadable"),
    ],
)
def test_a_damaged_backup_is_named_and_kept(workdir, capsys, interrupted_once, damage, expected):
    _, backup = _interrupted(workdir, interrupted_once)
    newest = backup.names()[-1]
    weights = newest / "weights.weights.h5"
    state = newest / "state.json"
    if damage == "truncate":
        weights.write_bytes(b"")
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    elif damage == "json":
        state.write_text("{not json")
    else:
        doc = json.loads(state.read_text())
        doc["epoch"] = int(damage.split("=")[1])
        state.write_text(json.dumps(doc))
    before = folder_digest(backup.folder)

    for _ in range(2):  # a second attempt must find the same backup, not epoch 0
        assert main(["run", "durable.yaml"]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(newest) in err
        assert "Nothing was overwritten" in err
        assert "--resume-older to continue from the older good backup" in err
        assert "(epoch 3)" in err and "--restart" in err
        assert "Traceback" not in err
        assert folder_digest(backup.folder) == before

    if damage != "truncate":
        return  # continuing from the older snapshot is the same for every kind of damage
    assert main(["run", "durable.yaml", "--resume-older"]) == 0
    out = capsys.readouterr().out
    assert f"set aside the damaged backup {newest}" in out
    assert "resuming from" in out and "after epoch 3 of 8" in out
    assert not backup.folder.exists()  # the finished run needs no resume state


def test_restart_starts_over_and_keeps_the_old_backup_aside(workdir, capsys, interrupted_once):
    _, backup = _interrupted(workdir, interrupted_once)
    (backup.names()[-1] / "weights.weights.h5").write_bytes(b"")
    assert main(["run", "durable.yaml", "--restart"]) == 0
    out = capsys.readouterr().out
    aside = backup.folder.with_name("backup.restarted")
    assert f"the earlier backup is kept aside in {aside}" in out
    assert "resuming" not in out and aside.is_dir()


def test_a_backup_from_an_older_dlpipe_is_not_trusted(workdir, capsys):
    text = spec_text()
    (workdir / "durable.yaml").write_text(text)
    old = run_dir_for(resolved(text)) / "backup"
    old.mkdir(parents=True)
    (old / "latest.weights.h5").write_bytes(b"")
    (old / "training_metadata.json").write_text('{"epoch": 999}')
    assert main(["run", "durable.yaml"]) == 2
    err = capsys.readouterr().err
    assert "in the format of an older dlpipe" in err and "--restart" in err


# --------------------------------------------------------------------------------------
# The run folder is held by one run at a time
# --------------------------------------------------------------------------------------


def test_a_second_run_of_the_same_spec_is_refused_with_the_owner_pid(workdir, capsys):
    text = spec_text()
    (workdir / "durable.yaml").write_text(text)
    folder = run_dir_for(resolved(text))
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert main(["run", "durable.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"another run of this spec (pid 4242) is using its run folder {folder}" in err
    assert "kill 4242" in err and "--set name=" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# Guards: divergence without NaN
# --------------------------------------------------------------------------------------


def test_an_exploding_loss_fails_the_run_naming_epoch_and_value(workdir):
    text = spec_text(epochs=5).replace("batch_size: 16", "batch_size: 16\n      optimizer: {learning_rate: 1.0e+6}")
    with pytest.raises(TrainingDiverged) as info:
        run(text)
    message = str(info.value)
    assert "loss became" in message and "the training diverged" in message
    assert "more than 100 x the reference 1.099" in message  # log(3 classes)
    assert "in epoch 1" in message
    # Only folders that exist are named.
    for word in message.split():
        if "mlruns/" in word:
            assert Path(word.rstrip(".,")).exists(), word


def test_divergence_guard_can_be_turned_off_and_has_a_max_loss(workdir):
    text = spec_text(epochs=3)
    off = text.replace("verbose: 0", "verbose: 0\n      divergence: {enabled: false}")
    off = off.replace("batch_size: 16", "batch_size: 16\n      optimizer: {learning_rate: 1.0e+6}")
    assert run(off).history["loss"][0] > 1e3  # diverged, not stopped
    capped = text.replace("verbose: 0", "verbose: 0\n      divergence: {max_loss: 1.0e-6}")
    with pytest.raises(TrainingDiverged, match=r"above divergence.max_loss=1e-06"):
        run(capped)


# --------------------------------------------------------------------------------------
# Real signals and a real full disk (subprocesses)
# --------------------------------------------------------------------------------------


def _start(repo: Path, workdir: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "run", str(repo / "pipelines" / "xor.yaml"),
         "--set", "train.epochs=120", "--set", "train.early_stopping=null",
         "--set", "train.checkpoint.every_seconds=0", "--set", "train.verbose=0", *args],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_checkpoint_write_ends_killed_and_resumes(workdir, repo, signum):
    from mlflow.tracking import MlflowClient

    proc = _start(repo, workdir)
    try:
        deadline = time.time() + 120
        hit = False
        while time.time() < deadline and proc.poll() is None and not hit:
            for backup in workdir.glob("mlruns/runs/*/backup"):
                try:
                    hit = any(p.name.startswith(".tmp-") for p in backup.iterdir())
                except OSError:
                    pass
            if hit:
                proc.send_signal(signum)
            else:
                time.sleep(0.0005)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert hit, out
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted" in out
    assert " KILLED" in out
    backup = BackupFolder(next(workdir.glob("mlruns/runs/*/backup")))
    epoch = backup.load(120).epoch  # the newest snapshot is whole
    assert not list(backup.folder.glob(".tmp-*"))

    again = _start(repo, workdir)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"after epoch {epoch} of 120" in out
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    statuses = [r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("dlpipe-training").experiment_id])]
    assert "RUNNING" not in statuses and "FAILED" not in statuses


def _mount_tmpfs(folder: Path, size_kb: int) -> bool:
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def test_a_full_disk_is_a_clear_error_and_leaves_no_torn_file(workdir, repo):
    from mlflow.tracking import MlflowClient

    home = workdir / "small"
    if not _mount_tmpfs(home, 1500):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        # Leave room for the run folder and a few checkpoints, not for 120 epochs of snapshots and plots.
        (home / "filler").write_bytes(b"\0" * 1440 * 1024)
        store = workdir / "store" / "mlflow.db"
        proc = _start(repo, workdir, env={"DLPIPE_HOME": str(home / "mlruns"),
                                          "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, out
        assert "no space left on device" in out and str(home / "mlruns") in out
        assert "Traceback" not in out and "fix tracking.uri" not in out
        assert not [p for p in home.rglob(".tmp-*")], "a temporary file was left behind"
        for folder in home.glob("mlruns/runs/*/backup"):
            BackupFolder(folder).load(120)  # whatever snapshot is there is whole
        client = MlflowClient(f"sqlite:///{store}")
        (run_info,) = client.search_runs(
            [client.get_experiment_by_name("dlpipe-training").experiment_id])
        assert run_info.info.status == "FAILED"
        assert "no space left on device" in run_info.data.tags["dlpipe.error"]
    finally:
        subprocess.run(["umount", str(home)], capture_output=True, timeout=30)
