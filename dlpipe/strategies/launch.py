"""``dlpipe run SPEC --local-workers N``: the N workers of a ``multi_worker`` run as
processes on this host.

Each worker is ``python -m dlpipe`` with the same command line, listening on a free
port of 127.0.0.1, with a ``TF_CONFIG`` naming every worker and its own index (worker
0 is the chief) and :data:`CHILD_ENV` set, so that it runs the spec instead of
launching. Their output is relayed line by line, each line labelled ``[worker i]``.

When a worker fails, the others notice on their own (their next collective op
fails, see :mod:`dlpipe.strategies.multi_worker`); any still running after
``grace`` seconds are terminated, then killed. The launcher exits with the first
failed worker's status, or 0 when all of them finished. On Linux a worker also
receives SIGTERM when the launcher dies, so no worker outlives it. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from dlpipe.errors import DlpipeError

#: Set in each worker the launcher starts (its index): that process runs the spec.
CHILD_ENV = "DLPIPE_LOCAL_WORKER"
#: Seconds the other workers get to stop by themselves after one has failed.
GRACE_SECONDS = 60.0
#: Seconds between SIGTERM and SIGKILL for a worker that has to be stopped.
KILL_AFTER = 10.0


def is_local_worker() -> bool:
    """Whether this process is a worker the launcher started."""
    return os.environ.get(CHILD_ENV) is not None


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    return json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    })


def check_spec(spec: Any, workers: int) -> None:
    """The spec must use the multi_worker strategy and leave the cluster to us."""
    if workers < 1:
        raise DlpipeError(f"--local-workers {workers}: expected a number of workers >= 1")
    if spec.strategy_name != "multi_worker":
        raise DlpipeError(
            f"--local-workers starts the workers of a multi_worker run, but {spec.source} "
            f"uses strategy {spec.strategy_name!r}; add --set strategy=multi_worker"
        )
    if getattr(spec.strategy_params, "workers", None):
        raise DlpipeError("--local-workers sets the cluster itself; remove "
                          "strategy.params.workers and strategy.params.index from the spec")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _relay(label: str, stream: IO[str], lock: threading.Lock, out: IO[str]) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{label} {line}" if line.endswith("\n") else f"{label} {line}\n")
            out.flush()
    stream.close()


def _status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def launch(argv: Sequence[str], workers: int, *, grace: float = GRACE_SECONDS,
           out: IO[str] | None = None) -> int:
    """Run ``python -m dlpipe *argv`` as ``workers`` local workers; wait for all of them
    and return 0, or the first failed worker's exit status (128 + N for signal N)."""
    out = out or sys.stdout
    lock = threading.Lock()
    ports = free_ports(workers)
    procs: list[subprocess.Popen[str]] = []
    linux = sys.platform.startswith("linux")
    for index in range(workers):
        env = {**os.environ, "TF_CONFIG": tf_config(ports, index), CHILD_ENV: str(index),
               "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dlpipe", *argv], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            bufsize=1, preexec_fn=_die_with_parent if linux else None,
        ))
    with lock:
        print(f"dlpipe: {workers} local workers on 127.0.0.1 (worker 0 is the chief): "
              + ", ".join(f"worker {i} pid {p.pid} port {port}"
                          for i, (p, port) in enumerate(zip(procs, ports, strict=True))),
              file=out, flush=True)
    relays = [threading.Thread(target=_relay, args=(f"[worker {i}]", p.stdout, lock, out),
                               daemon=True) for i, p in enumerate(procs)]
    for relay in relays:
        relay.start()

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        failed = _wait(procs, grace, lock, out)
    except KeyboardInterrupt:  # Ctrl+C reached the workers too; give them time to close
        forward(signal.SIGINT, None)
        _stop(procs, grace)
        failed = (-1, 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for relay in relays:
            relay.join(timeout=5)
    if failed is None:
        print(f"dlpipe: all {workers} local workers finished", file=out, flush=True)
        return 0
    return failed[1]


def _wait(procs: list[subprocess.Popen[str]], grace: float, lock: threading.Lock,
          out: IO[str]) -> tuple[int, int] | None:
    """Wait for every worker; after the first failure, stop those still running after
    ``grace`` seconds. Returns ``(index, exit code)`` of the first failure."""
    failed: tuple[int, int] | None = None
    deadline = None
    while any(p.poll() is None for p in procs):
        for index, p in enumerate(procs):
            code = p.poll()
            if failed is None and code:
                failed = (index, 128 - code if code < 0 else code)
                deadline = time.monotonic() + grace
                with lock:
                    print(f"dlpipe: worker {index} failed ({_status(code)}); the others stop "
                          f"when they notice, or are stopped in {grace:.0f} s", file=out,
                          flush=True)
        if deadline is not None and time.monotonic() > deadline:
            with lock:
                print("dlpipe: stopping the workers still running", file=out, flush=True)
            _stop(procs, 0)
            break
        time.sleep(0.2)
    if failed is None:
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
        if bad:
            index, code = bad[0]
            failed = (index, 128 - code if code < 0 else code)
    if failed is not None:
        with lock:
            print("dlpipe: local workers: " + ", ".join(
                f"worker {i} {_status(p.returncode) if p.returncode is not None else 'running'}"
                for i, p in enumerate(procs)), file=out, flush=True)
    return failed


def _stop(procs: list[subprocess.Popen[str]], grace: float) -> None:
    """Wait up to ``grace`` seconds, then SIGTERM, then SIGKILL after :data:`KILL_AFTER`."""
    end = time.monotonic() + grace
    for step, action in ((end, "terminate"), (end + KILL_AFTER, "kill")):
        while time.monotonic() < step and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                getattr(p, action)()
    for p in procs:
        p.wait()
