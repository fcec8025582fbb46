"""Tuning benchmark: dlpipe (TPE + median pruning) against KerasTuner and plain Optuna.

Every contestant tunes the same digit MLP (benchmarks/tune/plugins/bench_mlp.py) over
the same space (learning rate and L2 weight, both log-uniform), on the same split, for
the same wall-clock budget, in its own process, one after the other. The clock starts
when the process is launched, so start-up costs count for everyone.

    python benchmarks/bench_tune.py                 # 90 s per contestant (~7 minutes)
    python benchmarks/bench_tune.py --budget 40     # quicker

Reported: best validation accuracy against wall time, trials completed and pruned,
and the goal: the time dlpipe needs to reach KerasTuner's best value, as a share of
the time KerasTuner needed (target <= 0.5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TUNE = HERE / "tune"

DLPIPE_LINE = re.compile(r"tune: trial (\d+) (COMPLETE|PRUNED|FAIL)(?: val_accuracy=([0-9.eE+-]+))?")
TRIAL_LINE = re.compile(r"TRIAL (\w+) ([0-9.eE+-]+|None)")


def run_contestant(name: str, cmd: list[str], budget: float, cwd: Path) -> dict:
    """Launch ``cmd``, timestamp each finished trial, stop it at the budget."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "DLPIPE_HOME": str(cwd / "mlruns")}
    events: list[dict] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.monotonic() - t0
            m = DLPIPE_LINE.search(line)
            if m:
                value = float(m.group(3)) if m.group(3) else None
                events.append({"t": t, "state": m.group(2), "value": value})
                continue
            m = TRIAL_LINE.search(line)
            if m:
                value = None if m.group(2) == "None" else float(m.group(2))
                state = "COMPLETE" if m.group(1) in ("COMPLETE", "COMPLETED") else m.group(1)
                events.append({"t": t, "state": state, "value": value})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    events = [e for e in events if e["t"] <= budget]
    best, curve = None, []
    for e in events:
        if e["value"] is not None and (best is None or e["value"] > best):
            best = e["value"]
            curve.append({"t": round(e["t"], 2), "best": best})
    done = [e for e in events if e["state"] == "COMPLETE"]
    pruned = [e for e in events if e["state"] == "PRUNED"]
    result = {
        "name": name, "trials_complete": len(done), "trials_pruned": len(pruned),
        "best": best, "time_to_best": curve[-1]["t"] if curve else None, "curve": curve,
    }
    print(f"  {name:<22} best val_accuracy {best}  complete {len(done):>3}  pruned {len(pruned):>3}  "
          f"time to best {result['time_to_best']} s", flush=True)
    return result


def time_to_reach(curve: list[dict], value: float) -> float | None:
    # dlpipe prints 5 significant digits; one validation example is 1/270 = 0.0037.
    return next((p["t"] for p in curve if p["best"] >= value - 1e-4), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds per contestant")
    parser.add_argument("--output", type=Path, help="JSON results file")
    args = parser.parse_args()
    try:
        import keras_tuner  # noqa: F401
    except ImportError:
        print("keras-tuner is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        contestants = [
            ("dlpipe tpe+median", [py, "-m", "dlpipe", "run", str(TUNE / "mlp_tune.yaml"),
                                   "--plugins-dir", str(TUNE / "plugins"),
                                   "--set", f"tune.timeout={args.budget}"]),
            ("kerastuner random", [py, str(TUNE / "kerastuner_search.py"), "random", str(work / "kt")]),
            ("kerastuner hyperband", [py, str(TUNE / "kerastuner_search.py"), "hyperband", str(work / "kt")]),
            ("optuna random", [py, str(TUNE / "optuna_random.py"), str(args.budget)]),
        ]
        print(f"budget {args.budget:.0f} s per contestant, run one after the other", flush=True)
        results = {name: run_contestant(name, cmd, args.budget, work) for name, cmd in contestants}

    ours = results["dlpipe tpe+median"]
    goals = {}
    for other in ("kerastuner random", "kerastuner hyperband"):
        theirs = results[other]
        if theirs["best"] is None or theirs["time_to_best"] is None:
            continue
        reach = time_to_reach(ours["curve"], theirs["best"])
        goals[other] = {
            "their_best": theirs["best"], "their_time_to_best": theirs["time_to_best"],
            "dlpipe_time_to_reach": reach,
            "ratio": None if reach is None else round(reach / theirs["time_to_best"], 3),
        }
    print("goal: dlpipe reaches KerasTuner's best in <= 0.5 of KerasTuner's time")
    for other, g in goals.items():
        print(f"  vs {other:<20} their best {g['their_best']:.4f} at {g['their_time_to_best']:.1f} s; "
              f"dlpipe reached it at {g['dlpipe_time_to_reach']} s -> ratio {g['ratio']}")

    stamp = datetime.date.today().isoformat()
    out = args.output or HERE / "results" / f"tune_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget_s": args.budget, "results": results, "goals": goals}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"results: {out}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if r["curve"]:
            ts = [p["t"] for p in r["curve"]]
            bs = [p["best"] for p in r["curve"]]
            ax.step(ts, bs, where="post", label=f"{name} ({r['trials_complete']} done, {r['trials_pruned']} pruned)")
    ax.set_xlabel("wall time since launch (s)")
    ax.set_ylabel("best validation accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
