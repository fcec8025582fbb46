"""Time ``dlpipe run pipelines/vae.yaml`` against the hand-written Keras script.

Alternating runs of

  (a) ``python benchmarks/plain_keras_vae.py --epochs E``
  (b) ``dlpipe run pipelines/vae.yaml --set train.epochs=E --set train.early_stopping=null``

each in a fresh temporary working directory (so every dlpipe run starts a new
``mlruns/`` with a new MLflow SQLite database, and no run resumes an earlier one),
then the start-up time of ``dlpipe --help``, ``dlpipe validate`` and ``dlpipe plugins``.
Prints a table of medians and ratios with pass/fail against the goals and writes all
numbers as JSON to ``benchmarks/results/vae_<date>.json``. See benchmarks/README.md.

    python benchmarks/bench_vae.py                 # 5 rounds of 40 epochs (~10 minutes)
    python benchmarks/bench_vae.py --rounds 3
    python benchmarks/bench_vae.py --quick         # 2 rounds of 10 epochs, a smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PLAIN_SCRIPT = BENCH_DIR / "plain_keras_vae.py"
PROBE = BENCH_DIR / "probe" / "bench_probe.py"
SPEC = "pipelines/vae.yaml"

GOAL_WHOLE = 1.10  # whole-process wall time, dlpipe / plain
GOAL_EPOCH = 1.02  # median seconds per epoch, dlpipe / plain
GOAL_STARTUP_S = 1.0  # each start-up command, seconds


# --------------------------------------------------------------------------- helpers


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_after_first(values: list[float]) -> float | None:
    """Median over epochs 2.. (epoch 1 traces the step functions); the same rule is
    applied to both programs."""
    return median(values[1:] or values)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def dlpipe_command() -> list[str]:
    exe = shutil.which("dlpipe")
    return [exe] if exe else [sys.executable, "-m", "dlpipe"]


def base_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # track into the temp dir's mlruns/mlflow.db
    env["DLPIPE_HOME"] = str(workdir / "mlruns")
    env["DLPIPE_BENCH_PROBE"] = str(workdir / "dlpipe_probe.json")
    return env


def make_workdir(root: Path, name: str, probe: bool) -> Path:
    """A user's project folder: pipelines/ and plugins/ (plus the probe, if wanted)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    shutil.copytree(REPO / "pipelines", workdir / "pipelines")
    if (REPO / "plugins").is_dir():
        shutil.copytree(REPO / "plugins", workdir / "plugins")
    if probe:
        (workdir / "plugins").mkdir(exist_ok=True)
        shutil.copy(PROBE, workdir / "plugins" / PROBE.name)
    return workdir


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float, str]:
    """Run ``cmd``; return (launch time.time(), wall seconds, CPU seconds of the process
    and its children, stdout+stderr)."""
    launched = time.time()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return launched, wall, cpu, proc.stdout


# ------------------------------------------------------------------------------ runs


def run_plain(root: Path, epochs: int) -> dict[str, Any]:
    workdir = make_workdir(root, "plain", probe=False)
    cmd = [sys.executable, str(PLAIN_SCRIPT), "--epochs", str(epochs)]
    _, wall, cpu, out = timed(cmd, workdir, base_env(workdir))
    lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise SystemExit(f"no BENCH line from {PLAIN_SCRIPT.name}:\n{out[-3000:]}")
    report = json.loads(lines[-1][len("BENCH ") :])
    if report["epochs"] != epochs:
        raise SystemExit(f"the plain script ran {report['epochs']} epochs, not {epochs}")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "fit_s": report["fit_s"],
        "epoch_s": report["epoch_s"],
        "epoch_s_median": median_after_first(report["epoch_s"]),
        "epoch_period_s": report["epoch_period_s"],
        "epoch_period_s_median": median_after_first(report["epoch_period_s"]),
        "epoch_cpu_s": report["epoch_cpu_s"],
        "epoch_cpu_s_median": median_after_first(report["epoch_cpu_s"]),
        "phases": {
            "imports": report["import_s"],
            "data + model build": report["script_s"]
            - report["import_s"]
            - report["fit_s"]
            - (report["evaluate_s"] or 0.0)
            - (report["save_s"] or 0.0),
            "model.fit": report["fit_s"],
            "evaluate + save": (report["evaluate_s"] or 0.0) + (report["save_s"] or 0.0),
            "exit": wall - report["script_s"],
        },
        "workdir": str(workdir),
    }


def epoch_history(workdir: Path, run_id: str) -> tuple[list[float], list[int]]:
    """``epoch_time_s`` by epoch and the metric timestamps (ms), from the run's DB."""
    from mlflow.tracking import MlflowClient

    db = (workdir / "mlruns" / "mlflow.db").resolve()
    client = MlflowClient(f"sqlite:///{db.as_posix()}")
    history = sorted(client.get_metric_history(run_id, "epoch_time_s"), key=lambda m: m.step)
    return [m.value for m in history], [m.timestamp for m in history]


def _phases(events: list[tuple[str, float]], launched: float, wall: float) -> dict[str, float]:
    """Wall seconds of each part of a dlpipe run, from the probe's timestamps."""
    t = {name: stamp - launched for name, stamp in events}
    phases = {
        "start-up until plugins load": t["plugin_loaded"],
        "validate": t["before_run"] - t["plugin_loaded"],
        # before_run comes before TensorFlow's import; MLflow starts in a sidecar process
        "before_run hooks, import TF + Keras, strategy": t["stage_start:data"] - t["before_run"],
    }
    order = [name.split(":", 1)[1] for name, _ in events if name.startswith("stage_start:")]
    previous = "stage_start:data"
    for kind in order:
        start, end = f"stage_start:{kind}", f"stage_end:{kind}"
        if start != previous:  # other plugins' hooks between stages
            phases[f"hooks before {kind}"] = t[start] - t[previous]
        if kind == "train" and "fit_start" in t:
            phases["train: compile, tf.data"] = t["fit_start"] - t[start]
            phases["model.fit"] = t["fit_end"] - t["fit_start"]
            phases["train: save model + artifact"] = t[end] - t["fit_end"]
        else:
            phases[f"stage {kind}"] = t[end] - t[start]
        previous = end
    phases["after_run hooks (MLflow flush, end)"] = t["after_run_end"] - t[previous]
    phases["exit"] = wall - t["after_run_end"]
    return phases


def run_dlpipe(root: Path, epochs: int, probe: bool, extra: list[str]) -> dict[str, Any]:
    workdir = make_workdir(root, "dlpipe", probe=probe)
    cmd = [
        *dlpipe_command(),
        "run",
        SPEC,
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "train.early_stopping=null",
        *extra,
    ]
    launched, wall, cpu, out = timed(cmd, workdir, base_env(workdir))
    record = None
    probe_file = workdir / "dlpipe_probe.json"
    if probe and probe_file.is_file():
        record = json.loads(probe_file.read_text())
    found = re.findall(r"mlflow: run ([0-9a-f]{32}) in experiment", out)
    result: dict[str, Any] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "fit_s": None,
        "epoch_cpu_s_median": None,
        "workdir": str(workdir),
    }
    if found:
        # epoch_time_s as tracked; the epoch ends from the metric timestamps (ms steps).
        result["run_id"] = found[-1]
        epoch_s, stamps = epoch_history(workdir, found[-1])
        result["epoch_period_s"] = [
            (b - a) / 1000.0 for a, b in zip(stamps, stamps[1:], strict=False)
        ]
        result["epoch_period_s_median"] = median(result["epoch_period_s"])
    elif record is not None:  # --no-track: what the probe saw reported
        epoch_s = record["epoch_time_s"]
    else:
        raise SystemExit(f"no MLflow run id in the dlpipe output:\n{out[-3000:]}")
    if len(epoch_s) != epochs:
        raise SystemExit(f"dlpipe reported {len(epoch_s)} epochs, not {epochs} ({workdir})")
    result["epoch_s"] = epoch_s
    result["epoch_s_median"] = median_after_first(epoch_s)
    if record is not None:
        result["fit_s"] = record["fit_s"]
        result["epoch_period_s"] = record["epoch_period_s"]
        result["epoch_period_s_median"] = median_after_first(record["epoch_period_s"])
        result["epoch_cpu_s"] = record["epoch_cpu_s"]
        result["epoch_cpu_s_median"] = median_after_first(record["epoch_cpu_s"])
        result["phases"] = _phases(record["events"], launched, wall)
        result["callbacks"] = {
            f"{name}.{hook}": calls
            for name, hooks in record["callbacks"].items()
            for hook, calls in hooks.items()
        }
    result.setdefault("epoch_period_s_median", None)
    return result


def time_startup(root: Path, repeats: int) -> dict[str, Any]:
    """Median wall time of each start-up command (after one untimed warm-up call)."""
    workdir = make_workdir(root, "startup", probe=False)
    env = base_env(workdir)
    dl = dlpipe_command()
    commands = {
        "dlpipe --help": [*dl, "--help"],
        "dlpipe validate": [*dl, "validate", SPEC],
        "dlpipe plugins": [*dl, "plugins"],
        "python -c pass (reference)": [sys.executable, "-c", "pass"],
    }
    results = {}
    for name, cmd in commands.items():
        timed(cmd, workdir, env)  # warm the file cache
        walls = [timed(cmd, workdir, env)[1] for _ in range(repeats)]
        results[name] = {"median_s": median(walls), "runs_s": walls, "command": cmd}
    return results


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _verdict(value: float | None, limit: float, strict: bool = False) -> str:
    if value is None:
        return "n/a"
    ok = value < limit if strict else value <= limit
    return "PASS" if ok else "FAIL"


def summarize(plain: list[dict], dlpipe: list[dict]) -> dict[str, Any]:
    rows = {}
    for key in (
        "wall_s",
        "cpu_s",
        "fit_s",
        "epoch_s_median",
        "epoch_period_s_median",
        "epoch_cpu_s_median",
    ):
        p = median([r[key] for r in plain])
        d = median([r[key] for r in dlpipe])
        paired = [
            ratio(b[key], a[key])
            for a, b in zip(plain, dlpipe, strict=True)
            if a[key] is not None and b[key] is not None
        ]
        rows[key] = {
            "plain": p,
            "dlpipe": d,
            "ratio": ratio(d, p),
            "paired_ratio_min": min(paired) if paired else None,
            "paired_ratio_max": max(paired) if paired else None,
        }
    return rows


def phase_medians(runs: list[dict]) -> dict[str, float]:
    names: list[str] = []
    for r in runs:
        for name in r.get("phases", {}):
            if name not in names:
                names.append(name)
    medians = {n: median([r["phases"].get(n) for r in runs if "phases" in r]) for n in names}
    # Other plugins' hooks between stages take no measurable time; keep them if they do.
    return {n: v for n, v in medians.items() if not (n.startswith("hooks") and v < 0.005)}


def callback_costs(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per callback hook: median milliseconds per call (epoch hooks: epochs 2..) and
    median seconds per run in total, over the runs."""
    names: list[str] = []
    for r in runs:
        names += [n for n in r.get("callbacks", {}) if n not in names]
    costs = {}
    for name in names:
        calls = [r["callbacks"][name] for r in runs if r.get("callbacks", {}).get(name)]
        if not calls:
            continue
        per_call = median([median_after_first(c) for c in calls])
        total = median([sum(c) for c in calls])
        if total is not None and total >= 0.001:
            costs[name] = {"ms_per_call": 1000.0 * per_call, "total_s": total}
    return costs


def print_report(summary: dict, startup: dict, plain: list, dlpipe: list, args: Any) -> bool:
    label = {
        "wall_s": "whole process (s)",
        "cpu_s": "whole process, CPU (s)",
        "fit_s": "model.fit (s)",
        "epoch_s_median": "epoch, begin->end (s)",
        "epoch_period_s_median": "epoch, end->end (s)",
        "epoch_cpu_s_median": "epoch, end->end, CPU (s)",
    }
    goals = {"wall_s": GOAL_WHOLE, "epoch_s_median": GOAL_EPOCH}
    print()
    print(
        f"VAE on sklearn digits: {args.rounds} alternating rounds x {args.epochs} epochs, "
        f"batch 32; medians (epoch medians skip epoch 1)"
    )
    extra = [*(f"--set {v}" for v in args.dlpipe_set), *(["--no-track"] if args.no_track else [])]
    if extra:
        print(f"dlpipe variant: {' '.join(extra)}")
    header = (
        f"{'':<24}{'plain keras':>12}{'dlpipe':>10}{'ratio':>8}{'paired':>14}{'goal':>9}  result"
    )
    print(header)
    print("-" * len(header))
    passed = True
    for key, row in summary.items():
        goal = goals.get(key)
        verdict = _verdict(row["ratio"], goal) if goal else ""
        passed &= verdict != "FAIL"
        paired = (
            f"{_fmt(row['paired_ratio_min'])}-{_fmt(row['paired_ratio_max'])}"
            if row["paired_ratio_min"] is not None
            else "-"
        )
        digits = ".3f" if key.startswith("epoch") else ".2f"
        print(
            f"{label[key]:<24}{_fmt(row['plain'], digits):>12}{_fmt(row['dlpipe'], digits):>10}"
            f"{_fmt(row['ratio'], '.3f'):>8}{paired:>14}"
            f"{('<= ' + format(goal, '.2f')) if goal else '':>9}  {verdict}"
        )
    if startup:
        print()
        print(
            f"{'start-up (median of ' + str(args.startup_repeats) + ')':<32}{'s':>8}{'goal':>9}  result"
        )
    for name, row in startup.items():
        reference = name.endswith("(reference)")
        verdict = "" if reference else _verdict(row["median_s"], GOAL_STARTUP_S, strict=True)
        passed &= verdict != "FAIL"
        goal = "" if reference else f"< {GOAL_STARTUP_S:.0f}"
        print(f"{name:<32}{_fmt(row['median_s'], '.3f'):>8}{goal:>9}  {verdict}")

    for title, runs in (("plain keras", plain), ("dlpipe", dlpipe)):
        phases = phase_medians(runs)
        if phases:
            print()
            print(f"where the time goes, {title} (median s):")
            for name, value in phases.items():
                print(f"  {name:<38}{_fmt(value):>7}")
    costs = callback_costs(dlpipe)
    if costs:
        print()
        print("dlpipe's callbacks (median; per call over epochs 2..):")
        print(f"  {'callback.hook':<38}{'ms/call':>8}{'s/run':>8}")
        for name, cost in costs.items():
            print(f"  {name:<38}{cost['ms_per_call']:>8.1f}{cost['total_s']:>8.2f}")
    print()
    print("overall: " + ("PASS" if passed else "FAIL"))
    return passed


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per run (default 40)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, 10 epochs")
    parser.add_argument(
        "--startup-repeats", type=int, default=5, help="runs per start-up command (default 5)"
    )
    parser.add_argument("--skip-startup", action="store_true", help="do not time start-up")
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="run dlpipe without the measuring plugin (no fit time, no breakdown)",
    )
    parser.add_argument(
        "--dlpipe-set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="an extra --set for dlpipe run, to time a variant (repeatable), "
        "e.g. train.resume=false",
    )
    parser.add_argument("--no-track", action="store_true", help="time dlpipe run --no-track")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs = 2, 10
    extra = [arg for value in args.dlpipe_set for arg in ("--set", value)]
    if args.no_track:
        extra.append("--no-track")

    root = Path(tempfile.mkdtemp(prefix="dlpipe-bench-"))
    plain: list[dict] = []
    dlpipe: list[dict] = []
    started = time.time()
    try:
        for i in range(args.rounds):
            # Alternate the order as well (ABBA...), so neither always runs first.
            order = ("plain", "dlpipe") if i % 2 == 0 else ("dlpipe", "plain")
            for which in order:
                if which == "plain":
                    r = run_plain(root, args.epochs)
                    plain.append(r)
                else:
                    r = run_dlpipe(root, args.epochs, not args.no_probe, extra)
                    dlpipe.append(r)
                print(
                    f"round {i + 1}/{args.rounds} {which:<6}  whole {r['wall_s']:6.2f} s  "
                    f"fit {_fmt(r['fit_s']):>6} s  epoch {_fmt(r['epoch_s_median'], '.4f')} s",
                    flush=True,
                )
        startup = {} if args.skip_startup else time_startup(root, args.startup_repeats)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    summary = summarize(plain, dlpipe)
    passed = print_report(summary, startup, plain, dlpipe, args)

    today = dt.date.today().isoformat()
    out = args.output or BENCH_DIR / "results" / f"vae_{today}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "vae",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "probe": not args.no_probe,
        "dlpipe_extra_args": extra,
        "goals": {
            "whole_ratio": GOAL_WHOLE,
            "epoch_ratio": GOAL_EPOCH,
            "startup_s": GOAL_STARTUP_S,
        },
        "passed": passed,
        "summary": summary,
        "startup": startup,
        "phases": {"plain": phase_medians(plain), "dlpipe": phase_medians(dlpipe)},
        "dlpipe_callbacks": callback_costs(dlpipe),
        "runs": {"plain": plain, "dlpipe": dlpipe},
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "versions": _versions(),
        },
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if passed else 1


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in ("dlpipe", "tensorflow", "keras", "mlflow", "scikit-learn", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
