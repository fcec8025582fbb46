"""Which registered architectures run under XLA: ``model.compile(jit_compile=True)``.

For every architecture (or those named on the command line) it builds the model from
its ``example_params`` on its ``example_data`` (random 8x8 images where it has none),
as the conformance harness (:func:`dlpipe.testing.check_architecture`) does, compiles
it with ``jit_compile=True``, and runs one training step, one evaluation step and one
prediction: Keras compiles all three with XLA, and a train stage with
``jit_compile: true`` hands the evaluate stages after it a model compiled so. Each
architecture runs in a process of its own, so a crash or a hang in XLA costs that row
only.

Each step is ``ok``, ``fails`` (it raised under XLA, or its loss was not finite, but
runs without XLA; the note names the ops XLA has no kernel for when TensorFlow lists
them) or ``broken`` (it fails without XLA too: a fault of the probe, not of XLA). A
row's ``result`` is ``ok`` when all three are, ``keras-off`` when Keras refused XLA by
itself (a layer with ``supports_jit = False``), ``timeout`` or ``crashed`` when the
process hung or died, else ``fails`` / ``broken``.

``registered`` is the architecture's ``register_models(xla=...)`` flag: one whose
result is not ``ok`` should be registered with ``xla=False`` (the exit status is 1
while one is not). It runs on whatever device TensorFlow finds, and the header says
which: XLA's kernels for the CPU and the GPU differ. ``step s`` is the training step,
compilation included. Usage, from the repository root::

    python benchmarks/probe/xla_probe.py                 # all, table to stdout and results/
    python benchmarks/probe/xla_probe.py vae yolo        # some
    python benchmarks/probe/xla_probe.py --output -      # print only
    python benchmarks/probe/xla_probe.py --plugins-dir plugins my_net --output -
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MARK = "XLA_PROBE "  # the child's one result line starts with this


# ----------------------------------------------------------------------- one model

#: What ``jit_compile`` compiles: Keras wraps each of these steps in an XLA function.
PHASES = ("train", "evaluate", "predict")


def _phases(entry: Any, jit: bool) -> dict[str, Any]:
    """Build ``entry`` fresh, compile with ``jit_compile=jit``, then one training step,
    one evaluation step and one prediction; each phase ``"ok"`` or what went wrong."""
    import keras

    from dlpipe.plugins import resolve_ref
    from dlpipe.stages.model import wants_context
    from dlpipe.stages.train.compile import default_loss
    from dlpipe.testing import synthetic_bundle

    params = entry.params.model_validate(dict(entry.example_params or {}))
    if entry.example_data is not None:
        data = resolve_ref(entry.example_data, f"example_data of {entry.name}")()
    else:
        data = synthetic_bundle(entry.task)
    keras.utils.set_random_seed(0)
    build = entry.builder()
    model = build(params, data, None) if wants_context(build) else build(params, data)
    own_loss = bool(getattr(model, "loss_weights", None))
    loss, metrics = (None, []) if own_loss else default_loss(entry.task)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics or None,
                  jit_compile=jit)
    out: dict[str, Any] = {"jit": bool(model.jit_compile), "seconds": None}

    def train() -> str:
        start = time.perf_counter()
        history = model.fit(data.dataset("train", 8), epochs=1, steps_per_epoch=1, verbose=0,
                            shuffle=False)
        out["seconds"] = time.perf_counter() - start
        losses = [float(v[-1]) for k, v in history.history.items() if "loss" in k]
        return "ok" if losses and all(map(math.isfinite, losses)) else "loss not finite"

    def evaluate() -> str:
        split = "val" if data.size("val") else "train"
        model.evaluate(data.dataset(split, 8), steps=1, verbose=0)
        return "ok"

    def predict() -> str:
        model.predict(data.x["test"][:8], verbose=0)
        return "ok"

    for phase, run in zip(PHASES, (train, evaluate, predict), strict=True):
        try:
            out[phase] = run()
        except Exception as exc:  # reported per phase
            out[phase] = _summary(exc)
    return out


def _summary(exc: BaseException) -> str:
    """The ops XLA could not compile when TensorFlow names them, else the first line."""
    text = str(exc)
    ops = sorted(set(re.findall(r"No registered '(\w+)' OpKernel for XLA_\w+", text)))
    if ops:
        return "no XLA kernel for " + ", ".join(ops)
    for pattern in (r"(Detected unsupported operations[^\n]*)", r"(XLA compilation[^\n]*)"):
        found = re.search(pattern, text)
        if found:
            text = found.group(1)
            break
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= 160 else line[:157] + "..."


def registry(plugin_dirs: list[str], entry_points: bool) -> Any:
    """The built-ins, plus the plugins of ``plugin_dirs`` and (``entry_points``) the
    installed ones."""
    from dlpipe.plugins import load_plugins

    return load_plugins(plugin_dirs=plugin_dirs, entry_points=entry_points).registry


def child(name: str, plugin_dirs: list[str], entry_points: bool) -> int:
    """Probe one architecture; print one ``XLA_PROBE {json}`` line."""
    entry = registry(plugin_dirs, entry_points).models[name]
    row: dict[str, Any] = {"name": name, "registered": entry.xla}
    xla = _phases(entry, jit=True)
    if xla["seconds"] is not None:
        row["seconds"] = round(xla["seconds"], 1)
    failed = [p for p in PHASES if xla[p] != "ok"]
    # The same steps without XLA tell an XLA failure from a fault of the probe.
    plain = _phases(entry, jit=False) if failed else {p: "ok" for p in PHASES}
    notes = []
    for phase in PHASES:
        if xla[phase] == "ok":
            row[phase] = "ok"
        elif plain[phase] == "ok":
            row[phase] = "fails"
            notes.append(f"{phase}: {xla[phase]}")
        else:
            row[phase] = "broken"
            notes.append(f"{phase} (without XLA too): {plain[phase]}")
    if not xla["jit"]:
        row["result"] = "keras-off"
        notes.insert(0, "Keras turned jit_compile off (a layer does not support it)")
    elif not failed:
        row["result"] = "ok"
    else:
        row["result"] = "fails" if any(row[p] == "fails" for p in PHASES) else "broken"
    row["note"] = "; ".join(notes)
    print(MARK + json.dumps(row), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def probe(name: str, timeout: float, loading: list[str]) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", name, *loading],
                              capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"name": name, "result": "timeout", "note": f"over {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:150]
        return {"name": name, "result": "crashed", "note": f"exit {done.returncode}: {tail}",
                "wall": round(wall, 1)}
    row: dict[str, Any] = json.loads(lines[-1][len(MARK):])
    row["wall"] = round(wall, 1)
    return row


def device() -> str:
    code = ("import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); "
            "print(f'{len(g)} GPU' if g else 'CPU only')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return out.stdout.strip() or "unknown"


def table(rows: list[dict[str, Any]], header: list[str]) -> str:
    width = max(len("architecture"), *(len(r["name"]) for r in rows))
    lines = [*header, "",
             f"{'architecture':<{width}}  {'result':<9}  {'train':<6}  {'eval':<6}  "
             f"{'predict':<7}  {'step s':>6}  {'wall s':>6}  {'registered':<10}  note"]
    for r in rows:
        step = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        wall = f"{r['wall']:.1f}" if "wall" in r else "-"
        registered = {True: "xla", False: "xla=False"}.get(r.get("registered"), "?")
        lines.append(
            f"{r['name']:<{width}}  {r['result']:<9}  {r.get('train', '-'):<6}  "
            f"{r.get('evaluate', '-'):<6}  {r.get('predict', '-'):<7}  {step:>6}  {wall:>6}  "
            f"{registered:<10}  {r.get('note', '')}".rstrip())
    bad = [r["name"] for r in rows if r["result"] != "ok"]
    wrong = [r["name"] for r in rows if (r["result"] == "ok") != r.get("registered", True)]
    lines += ["", f"{len(rows) - len(bad)} of {len(rows)} run all three steps under XLA; "
              f"not: {', '.join(bad) or 'none'}",
              f"registered xla flag disagrees with the result: {', '.join(wrong) or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="architectures (default: every one)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per architecture")
    parser.add_argument("--output", help="the table's file; '-': print only "
                        "(default: benchmarks/results/xla_<date>.txt)")
    parser.add_argument("--plugins-dir", action="append", default=[], metavar="DIR",
                        help="also load the plugins of this folder (repeatable)")
    parser.add_argument("--entry-points", action="store_true",
                        help="also load installed plugins (the dlpipe entry points)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plugin_dirs = [str(Path(d).resolve()) for d in args.plugins_dir]
    if args.child:
        return child(args.child, plugin_dirs, args.entry_points)

    sys.path.insert(0, str(REPO))
    loading = [x for d in plugin_dirs for x in ("--plugins-dir", d)]
    loading += ["--entry-points"] if args.entry_points else []
    names = args.names or sorted(registry(plugin_dirs, args.entry_points).models)
    started = time.perf_counter()
    rows = []
    for name in names:
        row = probe(name, args.timeout, loading)
        rows.append(row)
        print(f"{name}: {row['result']} {row.get('note', '')}".rstrip(), file=sys.stderr, flush=True)
    header = [
        f"XLA probe: jit_compile=True; one train step, one evaluate step and one predict "
        f"per architecture (benchmarks/probe/xla_probe.py), {datetime.date.today().isoformat()}",
        f"device: {device()}; {platform.machine()}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, TensorFlow {version('tensorflow')}, "
        f"Keras {version('keras')}; {time.perf_counter() - started:.0f} s in all",
        "step s: the training step, XLA compilation included; wall s: the whole process "
        "(imports, building, the three steps)",
    ]
    text = table(rows, header)
    print(text)
    if args.output != "-":
        out = Path(args.output or RESULTS / f"xla_{datetime.date.today().isoformat()}.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["result"] == "ok" or not r.get("registered", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
