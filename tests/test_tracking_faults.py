"""Tracking when the store is unreachable, damaged or dies mid-run, and resumed runs.

Real MLflow on SQLite under a temporary folder; a failing disk is simulated inside the
real sidecar process (:func:`serve_with_fault`), everything else is real.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlpipe import paths, tracking
from dlpipe.cli import main

SPEC = """\
name: faults
experiment: faults
seed: 1
%(extra)s
stages:
  - {kind: data, use: xor, params: {layout: corners, repeats: 16}}
  - {kind: model, use: mlp, params: {hidden: [4], activation: tanh}}
  - kind: train
    use: keras_fit
    params: {epochs: %(epochs)d, batch_size: 16, verbose: 0, checkpoint: {every_seconds: 0}}
  - {kind: evaluate, use: classifier_report}
"""

#: A plugin that removes the tracking store's file after the second epoch.
REMOVER = """\
import os
from dlpipe import hookimpl

@hookimpl
def on_metrics(context, stage, metrics, step):
    if step == 1 and os.path.exists("mlruns/mlflow.db"):
        os.remove("mlruns/mlflow.db")
"""

#: A plugin that fills the disk under $FILL_DIR after the second epoch.
FILLER = """\
import os
from dlpipe import hookimpl

@hookimpl
def on_metrics(context, stage, metrics, step):
    target = os.path.join(os.environ["FILL_DIR"], "filler")
    if step == 1 and not os.path.exists(target):
        with open(target, "wb") as handle:
            try:
                while True:
                    handle.write(bytes(65536))
                    handle.flush()
            except OSError:
                pass
"""

#: A plugin that interrupts training after two epochs, once per marker file.
STOPPER = """\
import os
from dlpipe import hookimpl

@hookimpl
def on_metrics(context, stage, metrics, step):
    if step == 2 and os.path.exists("stop-after-epoch-2"):
        os.remove("stop-after-epoch-2")
        raise KeyboardInterrupt
"""

#: A plugin whose before_run fails after tracking's: the engine then calls no
#: on_run_error, and the training process exits with the tracking process running.
FAILING_START = """\
from dlpipe import hookimpl

@hookimpl(trylast=True)
def before_run(context):
    raise RuntimeError("a plugin failed to start")
"""


def write_spec(workdir: Path, epochs: int = 4, extra: str = "", name: str = "p.yaml") -> Path:
    path = workdir / name
    path.write_text(SPEC % {"epochs": epochs, "extra": extra})
    return path


def store_file(workdir: Path) -> Path:
    return workdir / "mlruns" / "mlflow.db"


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(paths.default_tracking_uri())


def runs_of(experiment: str = "faults") -> list:
    c = client()
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp is not None else []


def run_cli(workdir: Path, *args: str, timeout: float = 180) -> tuple[int, str, str, float]:
    """``dlpipe run`` in a process of its own: its exit status, outputs and duration."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe", "run", *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# Messages, without a run
# --------------------------------------------------------------------------------------


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


def test_store_errors_say_what_happened(tmp_path):
    from mlflow.exceptions import MlflowException

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))
    uri = f"sqlite:///{db}"
    full = chained(
        MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]"),
        sqlite3.OperationalError("database or disk is full"),
    )
    assert tracking.describe_failure(full, uri) == (
        "space", f"no space left on device for {db} (database or disk is full)"
    )
    enospc = OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/model.keras")
    assert tracking.describe_failure(enospc, uri) == (
        "space", "no space left on device for /data/artifacts/model.keras"
    )
    readonly = chained(MlflowException("..."), sqlite3.OperationalError("attempt to write a readonly database"))
    assert tracking.describe_failure(readonly, uri) == (
        "access", f"cannot write to {db} (attempt to write a readonly database)"
    )
    refused = chained(MlflowException("API request failed"), ConnectionRefusedError(111, "Connection refused"))
    assert tracking.describe_failure(refused, "http://127.0.0.1:9", connecting=True) == (
        "connect", "cannot reach the tracking server (connection refused)"
    )
    kind, text = tracking.describe_failure(ValueError("odd\nmore"), "http://x", connecting=True)
    assert (kind, text) == ("uri", "cannot open the tracking store: ValueError: odd")
    assert tracking.describe_failure(ValueError("odd"), "http://x") == ("store", "ValueError: odd")
    db.unlink()
    assert tracking.describe_failure(readonly, uri)[0] == "removed"


def test_only_connection_errors_suggest_fixing_the_uri():
    db = "sqlite:////data/mlflow.db"
    full = tracking.failure_message(db, "space", "no space left on device for /data/mlflow.db")
    assert full == (
        "MLflow tracking failed (sqlite:////data/mlflow.db): no space left on device for "
        "/data/mlflow.db\n    free some space there and run again, or run with --no-track"
    )
    for kind in ("access", "removed", "store"):
        assert "tracking.uri" not in tracking.failure_message(db, kind, "...")
    for kind in ("connect", "uri"):
        assert "fix tracking.uri / MLFLOW_TRACKING_URI" in tracking.failure_message(db, kind, "...")


def test_write_atomic_replaces_the_whole_file(tmp_path):
    from dlpipe.checkpoint import atomic_write_text

    path = tmp_path / "tracking.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, '{"run_id": "new"}')
    assert json.loads(path.read_text()) == {"run_id": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["tracking.json"]


def test_sqlite_file_of_a_uri():
    assert paths.sqlite_file("sqlite:////a/b/mlflow.db?timeout=5") == Path("/a/b/mlflow.db")
    assert paths.sqlite_file("sqlite:///:memory:") is None
    assert paths.sqlite_file("http://127.0.0.1:5000") is None


# --------------------------------------------------------------------------------------
# 1. An unreachable tracking server fails the run early
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unreachable_server_fails_within_seconds_before_training(workdir):
    uri = f"http://127.0.0.1:{closed_port()}"
    spec = write_spec(workdir)
    rc, out, err, took = run_cli(workdir, str(spec), "--set", f"tracking.uri={uri}", timeout=120)
    assert rc == 2, out + err
    assert (
        f"error: MLflow tracking failed ({uri}): cannot reach the tracking server "
        "(connection refused)\n    start the tracking server or fix tracking.uri / "
        "MLFLOW_TRACKING_URI, or run with --no-track"
    ) in err
    assert "mlflow: the run was not recorded: cannot reach the tracking server" in out
    assert "run None" not in out and "Traceback" not in err
    assert "data: xor" not in out  # failed before the first stage: nothing trained
    assert took < 30, f"took {took:.1f} s"  # ~10 s here; most of it importing TensorFlow


# --------------------------------------------------------------------------------------
# 2. An empty or damaged mlflow.db is refused, never replaced
# --------------------------------------------------------------------------------------


def test_empty_store_file_is_refused_not_recreated(workdir, capsys):
    db = store_file(workdir)
    db.parent.mkdir()
    db.touch()
    spec = write_spec(workdir)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: the tracking store {db.resolve()} is empty (0 bytes); dlpipe will not start "
        "a new store in its place.\n    Restore it from a backup if you have one, or move it "
        f"aside to start a new store (mv {db.resolve()} {db.resolve()}.damaged), or run with "
        "--no-track"
    ) in err
    assert db.stat().st_size == 0  # MLflow never touched it


def test_damaged_store_file_is_refused_and_a_backup_named(workdir, capsys):
    db = store_file(workdir)
    db.parent.mkdir()
    backup = db.with_name("mlflow.db.bak")
    sqlite3.connect(backup).execute("create table t (x)").connection.close()
    db.write_bytes(b"\x00garbage" * 100)
    spec = write_spec(workdir)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"the tracking store {db.resolve()} is not an SQLite database (damaged or overwritten)" in err
    assert f"Restore it from a backup if you have one (cp {backup.resolve()} {db.resolve()})" in err
    assert db.read_bytes() == b"\x00garbage" * 100


def test_sidecar_checks_the_store_file_too(tmp_path):
    """The sidecar checks again right before MLflow opens the file (under the lock)."""
    db = tmp_path / "mlflow.db"
    db.touch()
    sidecar = tracking.Sidecar(f"sqlite:///{db}")
    sidecar.send("attach", "k", "0123")
    with pytest.raises(Exception, match=r"is empty \(0 bytes\)"):
        sidecar.stop(timeout=60)
    assert db.stat().st_size == 0


# --------------------------------------------------------------------------------------
# 3. The store dies during a run
# --------------------------------------------------------------------------------------


def serve_with_fault(uri, requests, replies):
    """The real sidecar (in its own process), with one kind of MLflow write failing as a
    full disk makes it fail; ``DLPIPE_TEST_FAULT`` picks which."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    fault = os.environ["DLPIPE_TEST_FAULT"]
    log_batch, log_artifact = MlflowClient.log_batch, MlflowClient.log_artifact

    def failing_log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics and fault == "server-gone":
            server_gone()
        if metrics and fault == "sqlite-full":
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as exc:
                raise MlflowException(
                    "(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO metrics]"
                ) from exc
        return log_batch(self, run_id, metrics, *args, **kwargs)

    def server_gone(*args, **kwargs):
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except ConnectionRefusedError as exc:
            raise MlflowException("API request to http://... failed with exception ...") from exc

    if fault == "server-gone":  # every write once the run exists, closing it included
        MlflowClient.set_terminated = server_gone
        MlflowClient.set_tag = server_gone

    def failing_log_artifact(self, run_id, local_path, artifact_path=None):
        if artifact_path == "model" and fault == "artifact-enospc":
            raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/model.keras")
        return log_artifact(self, run_id, local_path, artifact_path)

    MlflowClient.log_batch = failing_log_batch
    MlflowClient.log_artifact = failing_log_artifact
    tracking.serve(uri, requests, replies)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, path",
    [("sqlite-full", "{db} (database or disk is full)"), ("artifact-enospc", "/full/disk/model.keras")],
)
def test_full_disk_is_named_and_the_run_marked_failed(workdir, monkeypatch, capsys, fault, path):
    monkeypatch.setenv("DLPIPE_TEST_FAULT", fault)
    monkeypatch.setattr(tracking, "serve", serve_with_fault)
    spec = write_spec(workdir, epochs=3)
    assert main(["run", str(spec)]) == 2
    captured = capsys.readouterr()
    db = store_file(workdir).resolve()
    what = f"no space left on device for {path.format(db=db)}"
    assert (
        f"error: MLflow tracking failed (sqlite:///{db}): {what}\n"
        "    free some space there and run again, or run with --no-track"
    ) in captured.err
    assert "tracking.uri" not in captured.err + captured.out
    (run,) = runs_of()
    # The store itself can still be written: the run is closed FAILED, with the reason.
    assert run.info.status == "FAILED"
    assert run.data.tags["dlpipe.tracking_error"] == what
    assert (
        f"mlflow: run {run.info.run_id} FAILED in experiment 'faults' (sqlite:///{db}): "
        f"MLflow tracking failed: {what}"
    ) in captured.out
    assert "run None" not in captured.out


@pytest.mark.slow
def test_a_server_gone_mid_run_is_named_and_the_exit_is_prompt(workdir, monkeypatch, capsys):
    monkeypatch.setenv("DLPIPE_TEST_FAULT", "server-gone")
    monkeypatch.setattr(tracking, "serve", serve_with_fault)
    spec = write_spec(workdir, epochs=3)
    start = time.monotonic()
    assert main(["run", str(spec)]) == 2
    assert time.monotonic() - start < 60
    captured = capsys.readouterr()
    db = store_file(workdir).resolve()
    gone = "cannot reach the tracking server (connection refused)"
    assert (
        f"error: MLflow tracking failed (sqlite:///{db}): {gone}\n    start the tracking "
        "server or fix tracking.uri / MLFLOW_TRACKING_URI, or run with --no-track"
    ) in captured.err
    (run,) = runs_of()
    assert (
        f"mlflow: run {run.info.run_id} could not be marked FAILED in the store ({gone}); "
        "it may still show as RUNNING"
    ) in captured.out
    assert "run None" not in captured.out


@pytest.mark.slow
def test_a_really_full_disk_under_the_store_then_the_run_resumes(workdir, monkeypatch):
    """mlflow.db on a tiny tmpfs that fills up mid-run: the message names the file and
    the full disk; once there is space again, the same command continues the run."""
    small = workdir / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3000k", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        db = small / "mlflow.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        monkeypatch.setenv("FILL_DIR", str(small))
        (workdir / "filler.py").write_text(FILLER)
        spec = write_spec(workdir, epochs=6, extra="plugins: [filler.py]")
        rc, out, err, _ = run_cli(workdir, str(spec))
        assert rc == 2, out + err
        what = f"no space left on device for {db} (database or disk is full)"
        assert (
            f"error: MLflow tracking failed (sqlite:///{db}): {what}\n"
            "    free some space there and run again, or run with --no-track"
        ) in err
        assert "tracking.uri" not in out + err and "run None" not in out
        (run,) = runs_of()
        run_id = run.info.run_id
        # Nothing could be written, not even the end of the run.
        assert (
            f"mlflow: run {run_id} could not be marked FAILED in the store ({what}); "
            "it may still show as RUNNING"
        ) in out
        assert run.info.status == "RUNNING"

        (small / "filler").unlink()
        rc, out, err, _ = run_cli(workdir, str(spec))
        assert rc == 0, out + err
        assert f"mlflow: resuming run {run_id} " in out
        (run,) = runs_of()
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
    finally:
        # This process's MLflow client may still hold the file open: detach lazily then.
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)


@pytest.mark.slow
def test_store_removed_mid_run_says_the_run_was_not_recorded(workdir):
    (workdir / "remover.py").write_text(REMOVER)
    spec = write_spec(workdir, epochs=6, extra="plugins: [remover.py]")
    rc, out, err, _ = run_cli(workdir, str(spec))
    db = store_file(workdir).resolve()
    assert rc == 2, out + err  # a clean exit: not a crash (139), not a hang
    removed = f"the store file {db} was removed during the run; what this run logged is lost"
    assert f"error: MLflow tracking failed (sqlite:///{db}): {removed}\n" in err
    assert "    run again to track in a new store, or run with --no-track" in err
    assert "mlflow: run " in out and f"was not recorded: {removed}" in out
    assert "run None" not in out and "tracking.uri" not in out + err
    assert "Traceback" not in err
    assert not db.exists()  # nothing half-made left for the next run to trip over


@pytest.mark.slow
def test_exit_without_closing_the_run_neither_hangs_nor_leaves_it_running(workdir):
    """A before_run failing after tracking's starts the tracking process but gets no
    on_run_error: the process must still exit, and the run must not stay RUNNING."""
    (workdir / "failing_start.py").write_text(FAILING_START)
    spec = write_spec(workdir, extra="plugins: [failing_start.py]")
    rc, out, err, took = run_cli(workdir, str(spec), timeout=120)
    assert rc == 1 and "a plugin failed to start" in err, out + err
    assert took < 60
    (run,) = runs_of()
    assert run.info.status == "KILLED"
    assert run.data.tags["dlpipe.error"] == "the training process exited without closing the run"


# --------------------------------------------------------------------------------------
# 4. A resumed run goes on in the same MLflow run
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resumed_run_continues_the_same_mlflow_run(workdir, capsys):
    (workdir / "stopper.py").write_text(STOPPER)
    spec = write_spec(workdir, epochs=5, extra="plugins: [stopper.py]")
    (workdir / "stop-after-epoch-2").touch()
    assert main(["run", str(spec)]) == 130  # interrupted in the third epoch
    out = capsys.readouterr().out
    (killed,) = runs_of()
    run_id = killed.info.run_id
    assert killed.info.status == "KILLED"
    (run_file,) = (workdir / "mlruns" / "runs").glob("faults-*/tracking.json")
    assert json.loads(run_file.read_text()) == {
        "uri": paths.default_tracking_uri(), "run_id": run_id, "experiment": "faults",
    }

    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert (
        f"mlflow: resuming run {run_id} in experiment 'faults' "
        f"({paths.default_tracking_uri()}) (resume 1)"
    ) in out
    (run,) = runs_of()  # one run, not two
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["dlpipe.resumed"] == "1"
    assert run.data.tags["dlpipe.resumed_after"].startswith("KILLED")
    assert "dlpipe.error" not in run.data.tags
    steps = [m.step for m in client().get_metric_history(run_id, "loss")]
    assert steps == [0, 1, 2, 3, 4]  # epochs of both segments, each once, at its own step
    assert run.data.params["train.epochs"] == "5"
    spec_files = sorted(a.path for a in client().list_artifacts(run_id, "spec"))
    assert spec_files == ["spec/p.yaml", "spec/resolved.yaml"]
    assert not run_file.exists()  # finished: the next run of the spec is a new one

    assert main(["run", str(spec)]) == 0
    assert "mlflow: tracking run " in capsys.readouterr().out
    assert len(runs_of()) == 2


@pytest.mark.slow
def test_restart_tracks_a_new_run(workdir, capsys):
    (workdir / "stopper.py").write_text(STOPPER)
    spec = write_spec(workdir, epochs=4, extra="plugins: [stopper.py]")
    (workdir / "stop-after-epoch-2").touch()
    assert main(["run", str(spec)]) == 130
    (killed,) = runs_of()
    capsys.readouterr()
    assert main(["run", str(spec), "--restart"]) == 0
    assert "mlflow: resuming run" not in capsys.readouterr().out
    runs = {r.info.run_id: r.info.status for r in runs_of()}
    assert len(runs) == 2 and runs[killed.info.run_id] == "KILLED"
    assert sorted(runs.values()) == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_a_finished_or_foreign_run_is_not_resumed(workdir, capsys):
    """tracking.json naming a finished run, or a run in another store, starts a new run."""
    spec = write_spec(workdir, epochs=2)
    assert main(["run", str(spec)]) == 0
    (finished,) = runs_of()
    (run_dir,) = (workdir / "mlruns" / "runs").glob("faults-*")
    record = {"uri": paths.default_tracking_uri(), "run_id": finished.info.run_id, "experiment": "faults"}
    (run_dir / "tracking.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["run", str(spec)]) == 0
    assert "mlflow: tracking run " in capsys.readouterr().out
    (run_dir / "tracking.json").write_text(json.dumps({**record, "uri": "sqlite:////elsewhere.db"}))
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "is in another store (sqlite:////elsewhere.db); tracking a new run" in out
    assert len(runs_of()) == 3
