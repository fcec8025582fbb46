"""The MLflow UI in a real browser: what a user sees of a training run and of a study.

Headless Chromium from Debian's package (``apt-get install chromium``), driven by
Playwright's Python client (``pip install playwright``); Playwright's own browser
download needs the network, so it is never used. Skipped where either is missing.

``DLPIPE_SCREENSHOTS=DIR`` keeps the screenshot of the run's charts in DIR.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tune_ux import SPEC as TUNE_SPEC

from dlpipe.cli import main

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: MLflow 3 opens experiments in its GenAI view; this lands on the training runs.
ML_VIEW = "workflowType=machine_learning"
#: Keep MLflow's assistant panel closed: it would cover half of the screenshot.
CLOSE_ASSISTANT = """
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""
#: A line chart of 3 points (one per epoch) among the run's metric charts.
PER_EPOCH_CHART = """() => [...document.querySelectorAll('.js-plotly-plot')].some(
    el => (el.data || []).some(t => t.type === 'scatter' && (t.y || []).length === 3))"""
#: A picture at least 300 pixels wide, loaded (an artifact PNG, not an icon).
LOADED_PICTURE = "() => [...document.images].some(i => i.complete && i.naturalWidth >= 300)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_ui(folder: Path, log: Path) -> Iterator[str]:
    """``dlpipe ui`` on a free port of 127.0.0.1, for the store in ``folder``; yields
    its address at once, before the server answers."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # One web worker and no GenAI job runner (about ten processes less): the server
        # answers in about 15 s instead of 30-50 s on 2 cores.
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlpipe", "ui", "--port", str(port)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # any that take longer to stop
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_until_up(address: str, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{address}/health", timeout=2) as reply:
            if reply.read().decode().strip() == "OK":
                return
        time.sleep(0.5)
    pytest.fail(f"the MLflow UI did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def only_run(client, experiment: str, nested: bool = False):
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if ("mlflow.parentRunId" in r.data.tags) == nested]
    return runs if nested else runs[0]


def test_mlflow_ui_shows_a_run_and_a_study(workdir, repo, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    # Create the store first: then the server starts while the runs train.
    (workdir / "mlruns").mkdir()
    client = MlflowClient(default_tracking_uri())
    client.search_experiments(max_results=1)
    log = tmp_path / "mlflow-ui.log"
    with mlflow_ui(workdir, log) as address:
        xor = str(repo / "pipelines" / "xor.yaml")
        assert main(["run", xor, "--set", "train.epochs=3", "--set", "train.verbose=0"]) == 0
        (workdir / "tune.yaml").write_text(textwrap.dedent(TUNE_SPEC))
        assert main(["run", "tune.yaml"]) == 0
        run = only_run(client, "dlpipe-training")
        study = only_run(client, "tune-ux")
        trials = only_run(client, "tune-ux", nested=True)
        assert len(trials) == 2
        wait_until_up(address, log)

        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(60_000)
                page.add_init_script(CLOSE_ASSISTANT)

                # The run: the spec's values as params...
                base = f"{address}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                page.goto(f"{base}?{ML_VIEW}")
                page.get_by_text("train.optimizer.learning_rate", exact=True).wait_for()
                text = page.inner_text("body")
                assert "Parameters" in text and "train.epochs" in text

                # ...a chart of each per-epoch metric...
                page.goto(f"{base}/model-metrics?{ML_VIEW}")
                page.wait_for_function(PER_EPOCH_CHART)
                shots = Path(os.environ.get("DLPIPE_SCREENSHOTS") or tmp_path)
                page.screenshot(path=shots / "mlflow-run.png")

                # ...and the plots among its artifacts.
                page.goto(f"{base}/artifacts/plots/learning_curves.png?{ML_VIEW}")
                page.wait_for_function(LOADED_PICTURE)

                # The study: its trials nested in its run, and the best values.
                base = f"{address}/#/experiments/{study.info.experiment_id}/runs/{study.info.run_id}"
                page.goto(f"{base}?{ML_VIEW}")
                page.get_by_text("Child runs", exact=True).wait_for()
                for trial in trials:
                    page.get_by_text(trial.info.run_name).first.wait_for()
                assert "best.train.optimizer.learning_rate" in page.inner_text("body")
            finally:
                browser.close()
