"""Kill a training run at random moments, again and again, and check what survives.

Each round starts ``dlpipe run SPEC`` (the same command every time, as a user would),
waits until training is under way, sleeps a random time and sends SIGKILL. Some rounds
are aimed: at a checkpoint write (the moment a temporary snapshot folder appears), and
one, near the end, after training, during evaluation. The next round is the re-run that must resume.
When the run finally completes, its model is compared with an uninterrupted run of
the same spec.

Reported per round and in total:

* ``resumed at``: the epoch the re-run continued from;
* ``durable``: the newest whole snapshot on disk after the kill (what must be resumed);
* ``lost``: checkpointed epochs the re-run did not get back (``durable - resumed``;
  the goal is 0);
* ``redone``: epochs finished after the last checkpoint, trained again (the work
  since the last checkpoint; with ``every_seconds=0`` at most one);
* whether the kill landed inside a checkpoint write (a ``.tmp-`` entry was left);
* MLflow runs left RUNNING once a round's store has been closed (the goal is 0),
  and the number of MLflow runs the whole sequence produced (the goal is 1).

    python benchmarks/kill_harness.py                     # xor, 24 rounds
    python benchmarks/kill_harness.py --rounds 40 --spec pipelines/mlp_iris.yaml

Op determinism is on (``TF_DETERMINISTIC_OPS=1``), so on the CPU the killed-and-
resumed run must end bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+)")
METRIC_LINE = re.compile(r" - loss: ")


def command(spec: str, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "dlpipe", "run", spec,
        "--set", f"train.epochs={epochs}",
        "--set", "train.checkpoint.every_seconds=0",
        "--set", "train.early_stopping=null",
        "--set", "train.restore_best=true",
        "--set", "train.verbose=2",
    ]


class Round:
    """One process: its output lines as they arrive."""

    def __init__(self, cmd: list[str], home: Path) -> None:
        env = {**os.environ, "DLPIPE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_DETERMINISTIC_OPS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(cmd, cwd=home.parent, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pattern in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return any(pattern in line for line in self.lines)
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=5)

    def resumed_at(self) -> int:
        for line in self.lines:
            m = re.search(r"resuming from .* after epoch (\d+)", line)
            if m:
                return int(m.group(1))
            if "training finished in an earlier run" in line:
                m = re.search(r"\((\d+) epochs", line)
                return int(m.group(1)) if m else -1
        return 0

    def epochs_finished(self) -> int:
        """Epochs whose end the progress output reported."""
        return sum(1 for line in self.lines if METRIC_LINE.search(line))


def _writing(backup: Path) -> bool:
    try:
        return any(p.name.startswith(".tmp-") for p in backup.iterdir())
    except OSError:  # the folder is being renamed or pruned
        return False


def durable_epoch(home: Path) -> tuple[int, bool]:
    """The epoch of the newest whole snapshot, and whether a write was cut off."""
    backups = list(home.glob("runs/*/backup"))
    if not backups:
        return 0, False
    folder = backups[0]
    torn = _writing(folder)
    epochs = []
    for snap in folder.glob("ckpt-*"):
        try:
            epochs.append(json.loads((snap / "state.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            continue
    return (max(epochs) if epochs else 0), torn


def run_statuses(home: Path) -> dict[str, int]:
    db = home / "mlflow.db"
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        rows = con.execute("select status, count(*) from runs group by status").fetchall()
    return {status: n for status, n in rows}


def model_digest(home: Path) -> str:
    import keras
    import numpy as np

    import dlpipe.models  # noqa: F401 - registers dlpipe's layers for loading

    path = next(home.glob("runs/*/model/model.keras"))
    model = keras.saving.load_model(path, compile=False)
    blob = b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())
    return hashlib.sha256(blob).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(REPO / "pipelines/xor.yaml"))
    parser.add_argument("--epochs", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cmd = command(str(Path(args.spec).resolve()), args.epochs)
    work = Path(tempfile.mkdtemp(prefix="dlpipe-kill-"))

    print(f"reference: one uninterrupted run of {Path(args.spec).name}, {args.epochs} epochs")
    ref_home = work / "reference" / "mlruns"
    ref_home.parent.mkdir(parents=True)
    ref = Round(cmd, ref_home)
    ref.proc.wait()
    ref.reader.join()
    if ref.proc.returncode != 0:
        print("\n".join(ref.lines[-20:]))
        return 1
    reference = model_digest(ref_home)

    home = work / "killed" / "mlruns"
    home.parent.mkdir(parents=True)
    rows: list[dict] = []
    final: Round | None = None
    print(f"{'round':>5} {'aim':<10} {'resumed at':>10} {'finished':>8} {'durable':>7} "
          f"{'lost':>4} {'redone':>6} {'in write':>8}")
    for i in range(1, args.rounds + 1):
        aim = "random"
        if i == args.rounds - 1:  # near the end: let training finish, kill in evaluation
            aim = "evaluate"
        elif i % 3 == 0:
            aim = "write"
        r = Round(cmd, home)
        started = r.wait_for("Epoch ", 120)
        if aim == "evaluate":
            r.wait_for("restored the best weights", 300)
            time.sleep(rng.uniform(0.0, 0.3))
        elif aim == "write":
            backup = None
            deadline = time.monotonic() + rng.uniform(1.0, 4.0)
            while time.monotonic() < deadline and r.proc.poll() is None:
                backup = backup or next(iter(home.glob("runs/*/backup")), None)
                if backup is not None and _writing(backup):
                    break
                time.sleep(0.001)
        elif started:
            time.sleep(rng.uniform(0.0, 4.0))
        if r.proc.poll() is not None and r.proc.returncode == 0:
            final = r  # it finished before the kill: this round is the last one
            r.reader.join(timeout=5)
            break
        r.kill()
        durable, torn = durable_epoch(home)
        rows.append({"round": i, "aim": aim, "resumed": r.resumed_at(),
                     "finished": r.resumed_at() + r.epochs_finished(),
                     "durable": durable, "torn": torn})
        time.sleep(0.5)
    if final is None:  # the last round, not killed
        final = Round(cmd, home)
        final.proc.wait()
        final.reader.join()
    # What each kill cost shows in where the next process resumed.
    resumes = [row["resumed"] for row in rows[1:]] + [final.resumed_at()]
    for row, resumed in zip(rows, resumes, strict=True):
        row["lost"] = max(row["durable"] - resumed, 0)
        row["redone"] = max(row["finished"] - resumed, 0)
    for row in rows:
        print(f"{row['round']:>5} {row['aim']:<10} {row['resumed']:>10} {row['finished']:>8} "
              f"{row['durable']:>7} {row['lost']:>4} {row['redone']:>6} "
              f"{'yes' if row['torn'] else 'no':>8}")
    if final.proc.returncode != 0:
        print("the final run failed:\n" + "\n".join(final.lines[-20:]))
        return 1
    time.sleep(3)
    statuses = run_statuses(home)
    digest = model_digest(home)
    lost = sum(r["lost"] for r in rows)
    print()
    print(f"rounds killed:            {len(rows)}")
    print(f"kills inside a write:     {sum(r['torn'] for r in rows)}")
    print(f"kills during evaluation:  {sum(r['aim'] == 'evaluate' for r in rows)}")
    print(f"rounds that resumed:      {sum(r['resumed'] > 0 for r in rows[1:])} of {len(rows) - 1}")
    print(f"checkpointed epochs lost: {lost}")
    print(f"epochs redone (since the last checkpoint): {sum(r['redone'] for r in rows)}")
    print(f"final run resumed at:     {final.resumed_at()}")
    print(f"MLflow runs by status:    {statuses}")
    print(f"final weights:            {digest} (uninterrupted: {reference}) "
          f"{'IDENTICAL' if digest == reference else 'DIFFERENT'}")
    ok = lost == 0 and statuses.get("RUNNING", 0) == 0 and digest == reference
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
