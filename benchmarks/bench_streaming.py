"""Streaming benchmark: a small CNN trained on a generated image folder through dlpipe's
data layer, in memory and streamed, side by side.

    python benchmarks/bench_streaming.py            # 64x64 images, 4k/16k/64k (~13 min on 2 cores)
    python benchmarks/bench_streaming.py --quick    # 32x32, 800/3.2k/12.8k: checks the script

Every measurement runs in a fresh process (``--child``), so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is that run's alone. The data goes through
``image_directory`` (``stream: false`` or ``true``) or the ``tfrecord`` stage on a
``dlpipe convert`` of the folder, and training through ``model.fit`` on
``DataBundle.epoch_dataset``, as the ``keras_fit`` stage does (without its callbacks and
tracking, which cost the same in both forms).

Reported:

* peak RSS at 1x, 4x and 16x the data. Streamed runs train under a memory cap,
  ``RLIMIT_DATA`` (``--cap-mb``), which the 16x folder's decoded images exceed several
  times (full mode); in-memory runs go without one where they fit ``--max-in-memory-gb``
  and under the cap at 16x, where they are expected to fail. ``RLIMIT_AS`` would not do:
  TensorFlow maps about 3 GB of address space before it has loaded anything.
* training images per second on the 1x folder, which fits in memory: in memory,
  streamed from the PNG files, streamed from raw TFRecords (median of the epochs after
  the first, which traces; median over ``--repeats`` runs in alternating order).
* the input pipeline's share of step time: one pass over an epoch's batches with no
  model (images per second), as a share of a training epoch's time. The pipeline
  overlaps training through prefetching, so the share is an upper bound of what it adds.

The table goes to ``benchmarks/results/streaming_<date>[_quick].txt``. On a shared
2-core machine the timings are upper bounds: another process on the cores slows either
path by tens of percent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLASSES = 10
BATCH = 64


# --------------------------------------------------------------------------------------
# The image folder
# --------------------------------------------------------------------------------------


def _write_images(job: tuple[str, int, int, int, int]) -> None:
    """Images ``start..stop`` of class ``label``: an oriented grating with a random
    phase, tint and noise (the class sets the orientation), as PNG."""
    import numpy as np
    from PIL import Image

    folder, label, start, stop, size = job
    rng = np.random.default_rng([label, start])
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / CLASSES
    for i in range(start, stop):
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        tint = rng.uniform(0.4, 1.0, size=3)
        pixels = 127.5 + 100 * wave[..., None] * tint + rng.normal(0, 12, (size, size, 3))
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(Path(folder) / f"{i:06d}.png", compress_level=1)


def make_folders(work: Path, size: int, base: int, factors: list[int]) -> dict[int, Path]:
    """``{factor: folder}``: the largest folder generated (once, reused), the smaller
    ones hard links to the first images of each class."""
    largest = max(factors)
    per_class = base * largest // CLASSES
    top = work / f"images_{size}px_{base * largest}"
    marker = top / "READY"
    if not marker.exists():
        shutil.rmtree(top, ignore_errors=True)
        jobs = []
        for label in range(CLASSES):
            (top / f"c{label}").mkdir(parents=True)
            for start in range(0, per_class, 2000):
                jobs.append((str(top / f"c{label}"), label, start,
                             min(start + 2000, per_class), size))
        started = time.perf_counter()
        with Pool(os.cpu_count() or 2) as pool:
            pool.map(_write_images, jobs)
        marker.write_text(json.dumps({"size": size, "images": per_class * CLASSES}))
        print(f"generated {per_class * CLASSES:,} images of {size}x{size} in "
              f"{time.perf_counter() - started:.0f} s: {top}", flush=True)
    folders = {}
    for factor in factors:
        if factor == largest:
            folders[factor] = top
            continue
        sub = work / f"{top.name}_{factor}x"
        if not (sub / "READY").exists():
            shutil.rmtree(sub, ignore_errors=True)
            keep = base * factor // CLASSES
            for label in range(CLASSES):
                (sub / f"c{label}").mkdir(parents=True)
                for i in range(keep):
                    os.link(top / f"c{label}" / f"{i:06d}.png", sub / f"c{label}" / f"{i:06d}.png")
            (sub / "READY").write_text("")
        folders[factor] = sub
    return folders


# --------------------------------------------------------------------------------------
# One measurement (a child process)
# --------------------------------------------------------------------------------------


def child(config: dict[str, Any]) -> None:
    """Load the data as ``config`` says, train, pass over the pipeline, print RESULT."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    import keras
    import numpy as np

    from dlpipe.stages.data import ImageDirectoryParams, TfrecordParams
    from dlpipe.stages.data.files import image_directory
    from dlpipe.stages.data.tfrecord import tfrecord

    class Context:
        seed, data, extras = 0, None, {}

    ctx: Any = Context()
    size = config["size"]
    split = {"val_fraction": 0.0, "test_fraction": 0.0}
    imported = time.perf_counter()
    if config["source"] == "tfrecord":
        tfrecord(ctx, TfrecordParams(files=config["path"] + "/*.tfrecord", **split))
    else:
        image_directory(ctx, ImageDirectoryParams(
            path=config["path"], image_size=(size, size), stream=config["stream"], **split))
    data = ctx.data
    loaded = time.perf_counter()

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(data.input_shape),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    epochs, n = config["epochs"], data.size("train")
    steps = -(-n // BATCH)
    marks: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs=None: marks.append(time.perf_counter()),
        on_epoch_end=lambda e, logs=None: marks.append(time.perf_counter()),
    )
    history = model.fit(data.epoch_dataset("train", BATCH, epochs=epochs, seed=0),
                        epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False,
                        callbacks=[timer])
    epoch_s = [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]

    pipeline_s = None
    if config["pipeline_pass"]:  # the input pipeline alone: one epoch's batches, no model
        ds = data.epoch_dataset("train", BATCH, first_epoch=1, epochs=2, seed=0)
        t = time.perf_counter()
        for _ in ds:
            pass
        pipeline_s = time.perf_counter() - t

    print("RESULT " + json.dumps({
        "images": n,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "epoch_s": epoch_s,
        "pipeline_s": pipeline_s,
        "accuracy": float(history.history["accuracy"][-1]),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "streamed": type(data).__name__ == "StreamingBundle",
        "train_bytes": n * int(np.prod(data.input_shape)) * 4,
    }), flush=True)


def measure(config: dict[str, Any], cap_mb: int | None) -> dict[str, Any]:
    """Run :func:`child` in a fresh process, under ``RLIMIT_DATA`` of ``cap_mb`` if given."""

    def limit() -> None:
        if cap_mb is not None:
            cap = cap_mb * 2**20
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        capture_output=True, text=True, env=env, preexec_fn=limit, cwd=REPO,
    )
    wall = time.perf_counter() - started
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "ok": True, "wall_s": wall, "cap_mb": cap_mb}
    errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    reason = next((ln for ln in reversed(errors) if "Error" in ln or "error" in ln),
                  errors[-1] if errors else f"exit {proc.returncode}")
    return {"ok": False, "rc": proc.returncode, "reason": reason.strip()[:160], "wall_s": wall,
            "cap_mb": cap_mb}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def train_rate(result: dict[str, Any]) -> float:
    """Training images per second: median over the epochs after the first."""
    later = result["epoch_s"][1:] or result["epoch_s"]
    return result["images"] / statistics.median(later)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small images and sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dlpipe-bench-streaming"),
                        help="where the generated folders are kept (reused)")
    parser.add_argument("--cap-mb", type=int, default=1024,
                        help="RLIMIT_DATA of the capped runs (default 1024)")
    parser.add_argument("--repeats", type=int, help="throughput runs per path (default 2, quick 1)")
    parser.add_argument("--max-in-memory-gb", type=float, default=7.0,
                        help="skip uncapped in-memory runs expected to peak above this")
    parser.add_argument("--output", type=Path, help="the table's file")
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    size, base = (32, 800) if args.quick else (64, 4000)
    factors = [1, 4, 16]
    repeats = args.repeats or (1 if args.quick else 2)
    epochs = 2 if args.quick else 3
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(args.work, size, base, factors)
    records = args.work / f"tfrecord_{size}px_{base}"
    if not (records / "manifest.json").exists():
        from dlpipe.convert import convert

        shutil.rmtree(records, ignore_errors=True)
        started = time.perf_counter()
        convert(folders[1], records, image_format="raw", shards=16, write=lambda s: None)
        print(f"converted the 1x folder to raw TFRecords in {time.perf_counter() - started:.0f} s",
              flush=True)

    def config(factor: int, source: str, stream: bool, epochs: int, pipeline: bool) -> dict:
        path = records if source == "tfrecord" else folders[factor]
        return {"path": str(path), "source": source, "stream": stream, "size": size,
                "epochs": epochs, "pipeline_pass": pipeline}

    # Throughput on the 1x folder, which fits in memory; alternating order.
    paths = {"in memory": ("folder", False), "streamed PNG files": ("folder", True),
             "streamed raw TFRecords": ("tfrecord", True)}
    rates: dict[str, list[dict]] = {name: [] for name in paths}
    for r in range(repeats):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            source, stream = paths[name]
            result = measure(config(1, source, stream, epochs, True), None)
            if not result["ok"]:
                raise SystemExit(f"{name}: {result['reason']}")
            rates[name].append(result)
            print(f"throughput {name} run {r + 1}: {train_rate(result):,.0f} images/s, "
                  f"RSS {result['rss_mb']:,.0f} MB", flush=True)

    # Peak RSS at 1x, 4x, 16x.
    decoded = {f: base * f * size * size * 3 * 4 for f in factors}
    rss: dict[tuple[str, int], dict] = {}
    for factor in factors:
        rss[("stream", factor)] = measure(config(factor, "folder", True, 1, False), args.cap_mb)
        # The in-memory form peaks at about 7x its decoded size: the decoded images, stacked,
        # split, normalized (with temporaries), and the tensor epoch_dataset makes of them.
        if 7 * decoded[factor] / 2**30 <= args.max_in_memory_gb:
            rss[("memory", factor)] = measure(config(factor, "folder", False, 1, False), None)
        else:
            rss[("memory", factor)] = {"ok": False, "skipped": True}
        if factor == max(factors):
            rss[("memory-cap", factor)] = measure(config(factor, "folder", False, 1, False),
                                                  args.cap_mb)
        for key in (("stream", factor), ("memory", factor)):
            one = rss[key]
            print(f"RSS {key[0]} {factor}x: "
                  + (f"{one['rss_mb']:,.0f} MB" if one.get("ok") else one.get("reason", "skipped")),
                  flush=True)

    lines = report(args, size, base, factors, epochs, repeats, decoded, rates, rss)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    date = datetime.date.today().isoformat()
    output = args.output or HERE / "results" / f"streaming_{date}{'_quick' if args.quick else ''}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}")
    return 0


def report(args: Any, size: int, base: int, factors: list[int], epochs: int, repeats: int,
           decoded: dict[int, int], rates: dict[str, list[dict]],
           rss: dict[tuple[str, int], dict]) -> list[str]:
    import tensorflow as tf

    def mb(result: dict) -> str:
        if result.get("skipped"):
            return f"skipped (> {args.max_in_memory_gb:g} GB)"
        if not result.get("ok"):
            return "FAILED: " + result.get("reason", "")[:60]
        return f"{result['rss_mb']:,.0f} MB"

    lines = [
        f"dlpipe streaming benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}"
        f"{' (--quick)' if args.quick else ''}",
        f"machine: {os.cpu_count()} CPU cores (shared with other work: timings are upper "
        f"bounds), Python {platform.python_version()}, TensorFlow {tf.__version__}",
        f"data: {CLASSES} classes of generated {size}x{size} RGB PNG gratings; a 3-conv CNN, "
        f"batch {BATCH}, Adam; files in the page cache (decode is measured, not the disk)",
        "",
        "Peak RSS of a fresh process (ru_maxrss), one training epoch",
        f"  streamed runs under RLIMIT_DATA = {args.cap_mb} MB; in-memory runs uncapped, and "
        "capped at 16x",
        f"  {'size':<5} {'images':>8} {'decoded f32':>12}  {'in memory':>22}  "
        f"{'streamed (capped)':>18}  {'in memory, capped':>22}",
    ]
    for factor in factors:
        capped = rss.get(("memory-cap", factor))
        lines.append(
            f"  {str(factor) + 'x':<5} {base * factor:>8,} {decoded[factor] / 2**20:>9,.0f} MB  "
            f"{mb(rss[('memory', factor)]):>22}  {mb(rss[('stream', factor)]):>18}  "
            f"{mb(capped) if capped else '':>22}"
        )
    first, last = rss[("stream", factors[0])], rss[("stream", factors[-1])]
    growth = last["rss_mb"] / first["rss_mb"] if first.get("ok") and last.get("ok") else None
    shown = "n/a" if growth is None else f"{growth:.2f}"
    verdict = "PASS" if growth is not None and growth <= 1.2 else "FAIL"
    big = decoded[max(factors)] / 2**20
    lines += [
        f"  streamed {factors[-1]}x / {factors[0]}x RSS: {shown} (goal <= 1.20: {verdict}); "
        f"the {factors[-1]}x folder decodes to {big:,.0f} MB, {big / args.cap_mb:.1f}x the cap",
        "",
        f"Training throughput on the 1x folder ({base:,} images, fits in memory): median of "
        f"epochs 2..{epochs}, median of {repeats} run(s)",
        f"  {'path':<24} {'train img/s':>11} {'vs memory':>9} {'load s':>7} "
        f"{'pipeline img/s':>14} {'input share':>11} {'RSS':>9}",
    ]
    memory_rate = statistics.median(train_rate(r) for r in rates["in memory"])
    for name, runs in rates.items():
        rate = statistics.median(train_rate(r) for r in runs)
        epoch = statistics.median(statistics.median(r["epoch_s"][1:] or r["epoch_s"])
                                  for r in runs)
        pipeline = statistics.median(r["pipeline_s"] for r in runs)
        load = statistics.median(r["load_s"] for r in runs)
        rss_mb = statistics.median(r["rss_mb"] for r in runs)
        lines.append(
            f"  {name:<24} {rate:>11,.0f} {rate / memory_rate:>9.2f} {load:>7.1f} "
            f"{runs[0]['images'] / pipeline:>14,.0f} {pipeline / epoch:>10.0%} {rss_mb:>6,.0f} MB"
        )
    for name in ("streamed PNG files", "streamed raw TFRecords"):
        ratio = statistics.median(train_rate(r) for r in rates[name]) / memory_rate
        lines.append(f"  {name} / in memory: {ratio:.2f} "
                     f"(goal >= 0.90: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    lines += [
        "  load s: building the bundle (in memory: decoding every image; streamed: listing "
        "files and a 512-image statistics pass)",
        "  input share: one epoch of the input pipeline alone / one training epoch (an upper "
        "bound: prefetching overlaps the two)",
        "",
        "Every run (train img/s per epoch after the first; wall s of the process):",
    ]
    for name, runs in rates.items():
        for r in runs:
            later = r["epoch_s"][1:] or r["epoch_s"]
            lines.append(f"  {name:<24} " + " ".join(f"{r['images'] / e:>6,.0f}" for e in later)
                         + f"   {r['wall_s']:>5.0f} s")
    for (kind, factor), r in sorted(rss.items(), key=lambda item: (item[0][1], item[0][0])):
        if r.get("ok"):
            lines.append(f"  RSS {kind:<10} {factor:>2}x  {r['rss_mb']:>7,.0f} MB  "
                         f"epoch {r['epoch_s'][0]:>6.1f} s   {r['wall_s']:>5.0f} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())
