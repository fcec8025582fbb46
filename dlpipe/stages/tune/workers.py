"""``--workers N``: N-1 more ``dlpipe run`` processes that join the study."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from dlpipe.spec import ResolvedSpec
from dlpipe.stages.tune import TuneParams

#: Set (to the worker's number) in the processes that ``--workers`` starts.
WORKER_ENV = "DLPIPE_TUNE_WORKER"
#: The number of trials the study should reach, passed to those workers.
TARGET_ENV = "DLPIPE_TUNE_TARGET"


def worker_number() -> int:
    """This process's worker number: 0 unless ``--workers`` started it."""
    return int(os.environ.get(WORKER_ENV, "0") or 0)


def start_workers(ctx: Any, params: TuneParams, target: int) -> list[subprocess.Popen[bytes]]:
    """Start ``workers - 1`` more processes on the same spec; they join the study."""
    spec: ResolvedSpec = ctx.spec
    cmd = [sys.executable, "-m", "dlpipe", "run", spec.source]
    for text in spec.overrides:
        cmd += ["--set", text]
    cmd += ["--set", f"{ctx.stage.id}.workers=1"]
    for folder in ctx.plugins.plugin_dirs:
        cmd += ["--plugins-dir", folder]
    tracker = ctx.extras.get("mlflow")
    if tracker is not None:
        cmd += ["--set", f"tracking.attach_run_id={tracker.wait_for_run_id()}"]
    elif not spec.settings.tracking.enabled:
        cmd += ["--no-track"]
    procs = []
    for i in range(1, params.workers):
        env = {**os.environ, WORKER_ENV: str(i), TARGET_ENV: str(target), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(cmd, env=env))
    print(f"tune: started {len(procs)} worker process(es)", flush=True)
    return procs


@contextlib.contextmanager
def worker_processes(ctx: Any, params: TuneParams, target: int, worker: int) -> Iterator[None]:
    """The main process's workers, alive for the ``with`` block: none in a worker or
    with ``workers: 1``. An error in the block stops them; either way they are awaited."""
    procs = start_workers(ctx, params, target) if params.workers > 1 and not worker else []
    try:
        yield
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    finally:
        for proc in procs:
            code = proc.wait()
            if code != 0:
                print(f"tune: worker process {proc.pid} exited with code {code}", flush=True)
