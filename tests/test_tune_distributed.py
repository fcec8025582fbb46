"""Tuning as several machines do it: separate ``dlpipe run`` processes on one study in
PostgreSQL, tracked through an ``mlflow server`` whose store is PostgreSQL too.

The PostgreSQL server is ``$DLPIPE_TEST_POSTGRES`` (an SQLAlchemy URL of a role that
may create databases; ``.ci/run`` starts a throwaway cluster and sets it). Without it
these tests start a cluster of their own from ``initdb``/``pg_ctl`` (on PATH or in
``/usr/lib/postgresql/*/bin``), and skip, saying why, where they cannot. Each test
works in databases of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ENV = "DLPIPE_TEST_POSTGRES"

SPEC = """\
name: dist
experiment: {experiment}
seed: 5
stages:
  - {{kind: data, use: xor, params: {{repeats: 4}}}}
  - {{kind: model, use: mlp, params: {{hidden: [4]}}}}
  - {{kind: train, use: keras_fit, params: {{epochs: {epochs}, batch_size: 16}}}}
  - kind: tune
    use: optuna
    params:
      space:
        train.optimizer.learning_rate: {{type: float, low: 1.0e-3, high: 1.0e-1, log: true}}
        model.hidden: {{type: categorical, choices: [[4], [8]]}}
      objective: {{metric: val_loss}}
      n_trials: {n_trials}
{extra}"""


def write_spec(folder: Path, n_trials: int, epochs: int = 1, experiment: str = "dist",
               extra: str = "") -> str:
    path = folder / "t.yaml"
    path.write_text(SPEC.format(n_trials=n_trials, epochs=epochs, experiment=experiment,
                                extra=textwrap.indent(extra, " " * 6)))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# PostgreSQL: the CI's cluster, or one of our own
# --------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()])
    for folder in reversed(found):
        if (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


@contextlib.contextmanager
def own_cluster() -> Iterator[str]:
    """A throwaway cluster on 127.0.0.1 and a free port, stopped and removed at the end.
    As root the server runs as the ``postgres`` user (it refuses root)."""
    folder = postgres_bin()
    if folder is None:
        pytest.skip(f"no PostgreSQL: set ${POSTGRES_ENV}, or install its server "
                    "(apt-get install -y postgresql)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root and no 'postgres' user to run PostgreSQL as; "
                        f"set ${POSTGRES_ENV}")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="dlpipe-test-postgres-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    port = free_port()
    data = root / "data"
    try:
        init = subprocess.run(
            [*as_user, str(folder / "initdb"), "-D", str(data), "-U", "dlpipe", "--auth=trust",
             "-E", "UTF8", "--no-sync"], capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-500:]}")
        start = subprocess.run(
            [*as_user, str(folder / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
             "-w", "-t", "60", "-o",
             f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200", "start"],
            capture_output=True, text=True, timeout=120)
        if start.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {(start.stderr + log).strip()[-500:]}")
        try:
            yield f"postgresql+psycopg2://dlpipe@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_user, str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """An SQLAlchemy URL of a PostgreSQL role that may create databases."""
    pytest.importorskip("psycopg2", reason="pip install 'dlpipe[postgres]'")
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        with own_cluster() as url:
            yield url
        return
    yield url
    for name in CREATED.pop(url, []):  # a server that stays: leave it as it was
        with contextlib.suppress(Exception):
            admin_sql(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: The databases the tests created, by server.
CREATED: dict[str, list[str]] = {}


def admin_sql(admin_url: str, statement: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    conn = psycopg2.connect(host=admin.host, port=admin.port, user=admin.username,
                            password=admin.password, dbname=admin.database or "postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


def new_database(admin_url: str, prefix: str) -> str:
    """Create an empty database; its URL (same server, role and driver)."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin_sql(admin_url, f'CREATE DATABASE "{name}"')
    CREATED.setdefault(admin_url, []).append(name)
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def plain_url(url: str) -> str:
    """``postgresql://...``: the URL as a user gives it to ``mlflow server``."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------
# An MLflow tracking server on PostgreSQL with proxied artifacts
# --------------------------------------------------------------------------------------


class MlflowServer:
    """``mlflow server`` on a new PostgreSQL database, started in the background: its
    first start creates the store's tables, which takes a while; the other tests run
    meanwhile, and :meth:`wait` waits for the rest."""

    def __init__(self, postgres_url: str) -> None:
        self.artifacts = Path(tempfile.mkdtemp(prefix="dlpipe-test-mlflow-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = plain_url(new_database(postgres_url, "mlflow"))
        self.log = open(self.artifacts.parent / f"{self.artifacts.name}.log", "w+")  # noqa: SIM115
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.ready = False

    def wait(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    self.ready = reply.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not answer in {timeout} s:\n{self.output()}")
                time.sleep(0.5)
        return self.uri

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        # Its store and artifacts are thrown away: no need to shut down gracefully.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.artifacts, ignore_errors=True)

    def run_artifacts(self, experiment_id: str, run_id: str) -> set[str]:
        """The files the server holds for a run (under ``--artifacts-destination``)."""
        folder = self.artifacts / experiment_id / run_id / "artifacts"
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def mlflow_server(postgres) -> Iterator[MlflowServer]:
    server = MlflowServer(postgres)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# The study lock and the sampler seeds (no TensorFlow)
# --------------------------------------------------------------------------------------

# Takes the study lock ``rounds`` times and appends when it held it to a file.
HOLDER = """\
import sys, time
from dlpipe.stages.tune.lock import StudyLock

url, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
lock = StudyLock(url, "study")
with open(out, "a") as log:
    for _ in range(rounds):
        lock.acquire()
        start = time.time()
        time.sleep(0.005)
        print(start, time.time(), file=log, flush=True)
        lock.release()
    if rounds == 0:
        lock.acquire()
        print("held", flush=True)
        time.sleep(600)
lock.close()
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def lock_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return new_database(request.getfixturevalue("postgres"), "lock")


def test_the_study_lock_excludes_other_processes(lock_url, tmp_path):
    from dlpipe.stages.tune.lock import StudyLock

    assert StudyLock(lock_url, "study").scope == "database"
    log = tmp_path / "held.txt"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, lock_url, str(log), "30"])
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 60
    overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
    assert overlaps == []


def test_a_killed_holder_frees_the_study_lock(lock_url, tmp_path):
    from dlpipe.stages.tune.lock import StudyLock

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_url, str(tmp_path / "x"), "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        lock = StudyLock(lock_url, "study")
        start = time.monotonic()
        lock.acquire()  # at once: the holder is gone from this machine / its session ended
        assert time.monotonic() - start < 10
        lock.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_processes_with_one_seed_draw_distinct_trials_and_one_repeats_itself(tmp_path):
    """Two processes with the same seed on one study (both worker 0, both finding it
    empty) draw distinct trials; one process alone draws the same ones each time."""
    import optuna

    from dlpipe.stages.tune import TuneParams
    from dlpipe.stages.tune.study import make_sampler

    params = TuneParams.model_validate({
        "space": {"a": {"type": "float", "low": 0.0, "high": 1.0},
                  "b": {"type": "int", "low": 0, "high": 1000}},
        "objective": {"metric": "val_loss"}, "startup_trials": 2,
    })

    def draw(study):
        trial = study.ask()
        values = (trial.suggest_float("a", 0.0, 1.0), trial.suggest_int("b", 0, 1000))
        study.tell(trial, values[0])
        return values

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = (optuna.create_study(study_name="s", storage=url, load_if_exists=True,
                                         sampler=make_sampler(params, 7)) for _ in range(2))
    shared = [draw(study) for _ in range(4) for study in (first, second)]  # TPE after 2
    assert len(set(shared)) == len(shared)

    alone = [optuna.create_study(sampler=make_sampler(params, 7)) for _ in range(2)]
    assert [draw(alone[0]) for _ in range(4)] == [draw(alone[1]) for _ in range(4)]


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


class Worker:
    """A ``dlpipe run`` process; what it prints goes to ``<cwd>/worker-<n>.log``."""

    def __init__(self, spec: str, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.log = cwd / f"worker-{len(list(cwd.glob('worker-*.log')))}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dlpipe", "run", spec, *args], cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def load_study(storage):
    import optuna

    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def param_sets(trials) -> list[tuple]:
    return [tuple(sorted((k, str(v)) for k, v in t.params.items())) for t in trials]


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_retried(postgres, mlflow_server, tmp_path):
    """Two processes share a PostgreSQL study; one is SIGKILLed mid-trial. The other
    sees its heartbeat stop, marks that trial failed, runs it again and completes.
    (``mlflow_server`` is only started here: its first start takes a while, and the
    tests after this one need it.)"""
    import optuna

    storage = new_database(postgres, "optuna")  # named in the spec this time
    spec = write_spec(tmp_path, n_trials=3, epochs=20,
                      extra=f"storage: {storage}\nheartbeat_interval: 1\ngrace_period: 4\n")
    victim = Worker(spec, tmp_path, {}, "--no-track")
    survivor = Worker(spec, tmp_path, {}, "--no-track")
    try:
        killed = None
        watch = None
        deadline = time.time() + 240
        while killed is None and time.time() < deadline and victim.proc.poll() is None:
            time.sleep(0.2)
            try:  # the workers create the tables and the study
                watch = watch or optuna.storages.RDBStorage(storage, skip_table_creation=True)
                study = load_study(watch)
            except Exception:  # noqa: BLE001 - not there yet
                continue
            for t in study.get_trials(deepcopy=False):
                if t.state.name == "RUNNING" and t.user_attrs.get("dlpipe.pid") == victim.pid:
                    victim.proc.send_signal(signal.SIGKILL)
                    killed = t.number
        assert killed is not None, "the victim never ran a trial:\n" + victim.output()
        assert survivor.wait(timeout=300) == 0, survivor.output()
    finally:
        victim.stop()
        survivor.stop()
    trials = load_study(storage).trials
    failed = [t.number for t in trials if t.state.name == "FAIL"]
    assert failed == [killed], [(t.number, t.state.name) for t in trials]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3  # the budget, exactly


@pytest.mark.slow
def test_two_machines_share_a_postgres_study_and_an_mlflow_server(postgres, mlflow_server, tmp_path):
    """Two separate ``dlpipe run`` processes, 0.5 s apart, as on two machines (both are
    worker 0): together exactly ``n_trials``, no parameter set twice, and every run
    and artifact on the tracking server."""
    from mlflow.tracking import MlflowClient

    n_trials = 6
    storage = new_database(postgres, "optuna")
    spec = write_spec(tmp_path, n_trials=n_trials, experiment="dist-machines")
    uri = mlflow_server.wait()
    client = MlflowClient(uri)
    # Created as `mlflow experiments create` does; an experiment that dlpipe creates on
    # a server is tested below.
    experiment_id = client.create_experiment("dist-machines")
    env = {"DLPIPE_OPTUNA_STORAGE": storage, "MLFLOW_TRACKING_URI": uri}
    workers = []
    try:
        for i in range(2):
            folder = tmp_path / f"machine{i}"  # each its own mlruns/, as on its own disk
            folder.mkdir()
            workers.append(Worker(spec, folder, env))
            time.sleep(0.5)
        for worker in workers:
            assert worker.wait(timeout=400) == 0, worker.output()
    finally:
        for worker in workers:
            worker.stop()

    # The study: exactly the budget, each trial with parameters of its own.
    study = load_study(storage)
    trials = study.trials
    states = [t.state.name for t in trials]
    assert len(trials) == n_trials and set(states) == {"COMPLETE"}, states
    sets = param_sets(trials)
    assert len(set(sets)) == len(sets), sets
    assert study.user_attrs["dlpipe.target"] == n_trials
    pids = {t.user_attrs["dlpipe.pid"] for t in trials}
    assert pids == {w.pid for w in workers}, workers[1].output()  # both took part
    split = [sum(t.user_attrs["dlpipe.pid"] == w.pid for t in trials) for w in workers]
    print(f"study: {len(trials)} trials, {len(set(sets))} parameter sets, per process {split}")

    # The server: a study run per process, a child run per trial, and their files.
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == n_trials
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert sorted(by_trial) == [t.number for t in trials]
    for t in trials:
        child = by_trial[t.number]
        assert child.info.run_id == t.user_attrs["mlflow_run_id"]
        assert child.data.tags["mlflow.parentRunId"] in parents
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 1
    assert client.search_runs(["0"]) == []  # nothing in Default
    for run in parents.values():
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        files = mlflow_server.run_artifacts(experiment_id, run.info.run_id)
        assert {"spec/t.yaml", "spec/resolved.yaml", "tune/study.json",
                "tune/trials.csv"} <= files, files
    # Nothing was written beside the workers instead of on the server.
    assert not list(tmp_path.glob("machine*/mlruns/artifacts/*/*"))


# What each process of the race test runs: dlpipe's tracking process creates a run in a
# new experiment, when the test says go, at the same moment as the others.
RACE = """\
import os, sys, time
from pathlib import Path
from dlpipe.tracking.run import artifact_root_for
from dlpipe.tracking.sidecar import Sidecar

uri, experiment, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sidecar = Sidecar(uri)
sidecar.send("attach", "warm", "-")  # connects: MLflow imported, the server answered
while "warm" not in sidecar.run_ids:
    sidecar.raise_if_failed()
    time.sleep(0.01)
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():
    time.sleep(0.002)
location = artifact_root_for(uri, None) if experiment == "dist-new" else str(folder)
sidecar.send("start", "run", None, experiment, location, "race", {}, {}, None, [])
while "run" not in sidecar.run_ids:
    sidecar.raise_if_failed()
    time.sleep(0.005)
sidecar.send("finish", "run", "FINISHED", None, {})
sidecar.stop()
print("RUN", sidecar.run_ids["run"], flush=True)
"""


def race_for_a_new_experiment(uri: str, experiment: str, folder: Path, processes: int) -> list[str]:
    """Start ``processes`` tracking processes that create a run in ``experiment`` at the
    same moment; their run ids."""
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, uri, experiment, str(folder)],
                         cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(processes)
    ]
    try:
        deadline = time.monotonic() + 180
        while len(list(folder.glob("ready-*"))) < processes:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the tracking processes did not connect"
            time.sleep(0.05)
        (folder / "go").touch()
        run_ids = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]
            run_ids += [line.split()[1] for line in out.splitlines() if line.startswith("RUN ")]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(run_ids) == processes
    return run_ids


@pytest.mark.slow
def test_processes_creating_a_new_experiment_at_once_all_log_into_it(mlflow_server, tmp_path):
    """MLflow's ``set_experiment`` may put a run in Default when processes create the
    same new experiment at once; dlpipe creates the experiment itself, takes the one
    that won on a conflict, and starts the run by its id."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.wait()
    run_ids = race_for_a_new_experiment(uri, "dist-race", tmp_path, processes=3)
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "dist-race"]
    assert len(experiments) == 1
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.experiment_id == experiments[0].experiment_id
        assert run.info.status == "FINISHED"
    assert client.search_runs(["0"]) == []  # nothing in Default


@pytest.mark.slow
def test_an_experiment_dlpipe_creates_on_a_server_keeps_artifacts_there(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.wait()
    race_for_a_new_experiment(uri, "dist-new", tmp_path, processes=1)
    experiment = MlflowClient(uri).get_experiment_by_name("dist-new")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
