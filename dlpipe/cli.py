"""The ``dlpipe`` command line.

Only ``dlpipe run`` imports TensorFlow, and only once the spec has validated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlpipe import __version__, paths
from dlpipe.errors import DlpipeError

EPILOG = """examples:
  dlpipe run pipelines/vae.yaml                      train, evaluate and track a VAE
  dlpipe run pipelines/vae.yaml --set train.epochs=3 override any value by dotted path
  dlpipe run pipelines/vae.yaml --restart            start over instead of resuming
  dlpipe validate pipelines/vae.yaml                 check a spec without running it
  dlpipe plugins                                     list plugins, stages and models
  dlpipe schema > dlpipe.schema.json                 JSON Schema for editors
  dlpipe ui                                          browse runs in the MLflow UI
  dlpipe runs                                        list recent runs, their metrics and params
  dlpipe compare 38adba6d 9f1e22aa                   params, metrics and curves side by side
  dlpipe predict 38adba6d data.csv -o out.csv        use a trained model
  dlpipe serve 38adba6d                              serve it over HTTP (MLflow scoring)
  dlpipe convert data/photos data/photos_tfr         images as sharded TFRecords (tfrecord stage)

Runs are tracked in sqlite:///mlruns/mlflow.db unless MLFLOW_TRACKING_URI or the
spec's tracking.uri says otherwise; runs, compare, predict, serve and ui read the same
store. A killed or failed run resumes from its last checkpoint when the same command
runs again, in the same MLflow run.
"""

RUNS_EPILOG = """examples:
  dlpipe runs                                        the newest 20 runs of every experiment
  dlpipe runs --experiment dlpipe-training --limit 5
  dlpipe runs --filter "metrics.test_accuracy > 0.9"
  dlpipe runs --filter "params.train.epochs = '3' and attributes.status = 'FINISHED'"

Columns: the run id's first 8 characters (what compare, predict and serve take), name,
status, start, duration, the key metric (test_accuracy, else test_loss, else the first
test_* metric) and the params that differ between the listed runs. --filter takes
MLflow's search syntax: metrics.NAME, params.NAME (values quoted), attributes.status.
"""

COMPARE_EPILOG = """examples:
  dlpipe compare 38adba6d 9f1e22aa                   by run id or a unique id prefix
  dlpipe compare xor xor-smoke -o curves.png         by run name (the newest of that name)

Prints the params that differ and every final metric, one column per run, and writes
one PNG overlaying the runs' learning curves (solid: training, dashed: validation).
"""

PREDICT_EPILOG = """examples:
  dlpipe predict 38adba6d pipelines/xor.yaml         the test split of a spec's data stage
  dlpipe predict 38adba6d points.csv -o out.csv      a CSV of numbers (a label column is kept aside)
  dlpipe predict runs:/<run id>/model inputs.npz     an npz (array x, or its only array)
  dlpipe predict models:/digits@champion images/     a folder of PNG/JPEG images
  dlpipe predict mlruns/runs/xor-fbdcf94c9c45/model/model.keras points.csv

MODEL: a run id, id prefix or run name, runs:/..., models:/NAME@alias, an MLflow model
folder or a .keras file. Inputs are raw, as the data source had them: the model applies
its data stage's preprocessing (a spec's test split is turned back into raw values).
Images are resized to the model's input; their pixels are read as 0..1, or mapped onto
the training data's range when its data stage min-max scaled it. A CSV column named
label, target, y or class is kept aside and scored against.

Writes a CSV for tables (label, class_name, probabilities_<class>, values), a PNG grid
(and an npz) for images, an npz otherwise; -o picks the file and, by its suffix, the
format. Prints a short summary (predicted classes, accuracy against labels).
"""

SERVE_EPILOG = """examples:
  dlpipe serve 38adba6d                              http://127.0.0.1:5001/invocations
  dlpipe serve models:/digits@champion --port 8080

Runs MLflow's scoring server (mlflow models serve --env-manager local) on the model,
with MLFLOW_TRACKING_URI set to dlpipe's store. POST JSON to /invocations, e.g.
{"inputs": [[0.0, 1.0]]}; Ctrl+C stops it.
"""


def _add_plugin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugins-dir",
        action="append",
        metavar="DIR",
        help="load every .py file in DIR as a plugin (repeatable; default: ./plugins)",
    )


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="pipeline spec (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a value by dotted path, e.g. train.epochs=3 or "
        "train.optimizer.learning_rate=1e-3 (repeatable; the value is read as YAML)",
    )
    _add_plugin_options(p)


CONVERT_EPILOG = """examples:
  dlpipe convert data/photos data/photos_tfr                  keep the files' bytes, 10+ shards
  dlpipe convert data/photos data/photos_tfr --image-size 64 64 --shards 32
  dlpipe convert images.npz data/images_tfr --val-fraction 0.1 --test-fraction 0.1

Then read them with a data stage:
  - kind: data
    use: tfrecord
    params: {files: data/photos_tfr/*.tfrecord, image_size: [64, 64]}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlpipe",
        description="Declarative deep-learning pipelines: YAML specs, plugins, "
        "Keras on TensorFlow, MLflow tracking.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dlpipe {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # --debug is accepted after the command too (dlpipe run spec.yaml --debug).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors"
    )

    p = sub.add_parser("run", parents=[common], help="run a pipeline", description="Validate, then run every stage of a pipeline and track it in MLflow.")
    _add_spec_options(p)
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="quick end-to-end check: every train stage runs one epoch of at most 3 "
        "batches, tuners 2 trials; tracked as <name>-smoke in its own run folder",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--restart",
        action="store_true",
        help="start over instead of resuming an unfinished earlier run of this spec "
        "(its backup is kept aside in the run folder) and track a new MLflow run",
    )
    resume.add_argument(
        "--resume-older",
        action="store_true",
        help="when the newest resume snapshot is damaged, set it aside and continue "
        "from the older good one",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="tune stage: run trials in N processes sharing the study (sets <tune>.workers)",
    )
    p.add_argument(
        "--local-workers",
        type=int,
        metavar="N",
        help="strategy multi_worker: run the spec as N worker processes on this host "
        "(127.0.0.1, free ports, each with its TF_CONFIG; worker 0 is the chief), "
        "relay their labelled output and fail if any of them fails",
    )

    p = sub.add_parser("validate", parents=[common], help="check a spec without running it", description="Check a spec: structure, every use: resolves, every plugin's params validate. Does not import TensorFlow.")
    _add_spec_options(p)

    p = sub.add_parser("plugins", parents=[common], help="list plugins and what they register")
    _add_plugin_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("schema", parents=[common], help="print the JSON Schema of pipeline specs")
    _add_plugin_options(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    p = sub.add_parser("ui", parents=[common], help="start the MLflow UI on the tracking store")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    _add_store_option(p, "store to show")

    def looking_back(name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, parents=[common], help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
            epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = looking_back("runs", "list recent runs in the tracking store", RUNS_EPILOG)
    p.add_argument("--experiment", metavar="NAME", help="only this experiment (default: all)")
    p.add_argument("--filter", metavar="EXPR", help="MLflow search expression, e.g. "
                   "\"metrics.test_accuracy > 0.9\"")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    _add_store_option(p, "store to list")

    p = looking_back("compare", "compare runs: params, final metrics, learning curves", COMPARE_EPILOG)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run id, unique id prefix or run name")
    p.add_argument("-o", "--output", default="compare.png", metavar="FILE",
                   help="where to write the learning-curve plot (default compare.png)")
    _add_store_option(p, "store the runs are in")

    p = looking_back("predict", "predict with a trained model", PREDICT_EPILOG)
    p.add_argument("model", metavar="MODEL",
                   help="run id/prefix/name, runs:/..., models:/NAME@alias, or a model file")
    p.add_argument("input", metavar="INPUT",
                   help="an .npz, a folder of images, a .csv, or a spec (its test split)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output file (.csv, .npz or .png; default predictions.<kind>)")
    _add_store_option(p, "store the model's run is in")
    _add_plugin_options(p)

    p = looking_back("serve", "serve a trained model over HTTP with MLflow", SERVE_EPILOG)
    p.add_argument("model", metavar="MODEL",
                   help="run id/prefix/name, runs:/..., models:/NAME@alias, or a model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    _add_store_option(p, "store the model's run is in")

    p = looking_back("convert", "write images as sharded TFRecord files for the tfrecord "
                     "data stage", CONVERT_EPILOG)
    p.add_argument("source", metavar="SOURCE",
                   help="a folder of class sub-folders of images, or an .npz of images")
    p.add_argument("output", metavar="OUTPUT", help="folder for the shards and manifest.json")
    p.add_argument("--shards", type=int, metavar="N",
                   help="number of files (default: ~128 MB each, at least 10)")
    p.add_argument("--format", choices=("encoded", "raw"), dest="image_format",
                   help="encoded: the image files' bytes (default for folders); raw: decoded "
                   "pixels (default for .npz and with --image-size)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize to H x W while converting (raw)")
    p.add_argument("--color-mode", choices=("rgb", "grayscale"), default="rgb")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="write a validation split as its own shards (default: none)")
    p.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                   help="write a test split as its own shards (default: none)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and split seed (default 0)")
    p.add_argument("--x-key", default="x", help=".npz: the images' array (default x)")
    p.add_argument("--y-key", default="y", help=".npz: the labels' array (default y)")
    return parser


def _add_store_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tracking-uri", metavar="URI", help=f"{what} (default: where dlpipe run "
                   "tracks: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")


# --------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Read the spec, load plugins (its own included), validate. No TensorFlow."""
    from dlpipe.plugins import load_plugins
    from dlpipe.spec import apply_overrides, read_spec_file, spec_plugins, validate

    doc = read_spec_file(args.spec)
    apply_overrides(doc, args.overrides)
    host = load_plugins(
        plugin_dirs=args.plugins_dir,
        spec_plugins=spec_plugins(doc),
        spec_dir=Path(args.spec).resolve().parent,
    )
    if getattr(args, "workers", None) is not None:
        stage_id = _tune_stage_id(doc, host.registry, args.workers)
        if stage_id is not None:
            workers = f"{stage_id}.workers={args.workers}"
            apply_overrides(doc, [workers])
            args.overrides = [*args.overrides, workers]
    return validate(doc, host.registry, args.overrides), host


def _tune_stage_id(doc: Any, registry: Any, workers: int) -> str | None:
    """The name of the stage that runs the stages before it (tune), whose ``workers``
    ``--workers`` sets; ``None`` when a stage names no registered plugin (validation
    then says which)."""
    from dlpipe.errors import DlpipeError

    if workers < 1:
        raise DlpipeError(f"--workers {workers}: expected a number of processes >= 1")
    stages = doc.data.get("stages") if isinstance(doc.data, dict) else None
    unknown = False
    for stage in stages if isinstance(stages, list) else []:
        kind = stage.get("kind") if isinstance(stage, dict) else None
        use = stage.get("use") if isinstance(stage, dict) else None
        entry = registry.lookup_stage(kind, use) if isinstance(kind, str) and isinstance(use, str) else None
        if entry is None:
            unknown = True
        elif entry.drives_previous:
            return str(stage.get("name") or kind)
    if unknown:
        return None
    raise DlpipeError(f"--workers: {doc.source} has no tune stage; workers run tuning trials")


def cmd_validate(args: argparse.Namespace) -> int:
    spec, host = _load(args)
    print(f"{args.spec}: valid ({len(spec.stages)} stages, strategy {spec.strategy_name})")
    for stage in spec.stages:
        print(f"  {stage.id:<12} {stage.kind}/{stage.use}  [{stage.plugin}]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec, host = _load(args)
    if getattr(args, "local_workers", None) is not None:
        from dlpipe.strategies import launch

        if not launch.is_local_worker():  # the launcher; each worker runs the spec
            launch.check_spec(spec, args.local_workers)
            return launch.launch(getattr(args, "argv", sys.argv[1:]), args.local_workers)
    if args.no_track:
        spec.settings.tracking.enabled = False
    import signal

    from dlpipe.engine import run_pipeline

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # `kill` behaves like Ctrl+C: the MLflow run is closed as KILLED, checkpoints stay.
    signal.signal(signal.SIGTERM, terminate)
    # A process started with SIGINT ignored (a background job of a script, a parent that
    # ignores it) would otherwise not stop on `kill -INT` at all.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"dlpipe: running {spec.name} ({len(spec.stages)} stages) from {args.spec}")
    ctx = run_pipeline(
        spec, host, smoke=args.smoke, restart=args.restart, resume_older=args.resume_older
    )
    from dlpipe.runs import run_summary, store_uri

    tracking = spec.settings.tracking
    print(f"dlpipe: done; outputs in {ctx.run_dir}")
    for line in run_summary(ctx, store_uri(tracking.uri) if tracking.enabled else None):
        print(line)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from dlpipe.plugins import load_plugins

    host = load_plugins(plugin_dirs=args.plugins_dir)
    reg = host.registry
    rows: list[dict[str, Any]] = []
    for info in host.plugins:
        stages = sorted(
            f"{kind}/{name}" for kind, table in reg.stages.items()
            for name, e in table.items() if e.plugin == info.name
        )
        models = sorted(n for n, e in reg.models.items() if e.plugin == info.name)
        strategies = sorted(n for n, e in reg.strategies.items() if e.plugin == info.name)
        rows.append(
            {
                "name": info.name,
                "version": info.version,
                "source": info.source,
                "origin": info.origin,
                "hooks": info.hooks,
                "stages": stages,
                "models": models,
                # register_models(xla=...): whether each model trains under jit_compile
                "xla": {n: reg.models[n].xla for n in models},
                "strategies": strategies,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        print(f"{row['name']}{version}  [{row['source']}: {row['origin']}]")
        print(f"  hooks:      {', '.join(row['hooks'])}")
        shown = {
            "stages": row["stages"],
            "models": [n if row["xla"][n] else f"{n} (no XLA)" for n in row["models"]],
            "strategies": row["strategies"],
        }
        for key, names in shown.items():
            if names:
                print(f"  {key + ':':<11} {', '.join(names)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from dlpipe.plugins import load_plugins
    from dlpipe.schema import spec_json_schema

    text = json.dumps(spec_json_schema(load_plugins(plugin_dirs=args.plugins_dir).registry), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def ui_command(uri: str, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--default-artifact-root", paths.default_artifact_root().resolve().as_uri(),
        "--host", host,
        "--port", str(port),
    ]


def cmd_ui(args: argparse.Namespace) -> int:
    from dlpipe import runs

    uri = runs.store_uri(args.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    latest = runs.latest_experiment(uri)
    if latest is not None:
        url = runs.experiment_url(latest[0], args.host, args.port)
        print(f"latest experiment {latest[1]!r}: {url}")
    print(runs.cli_hint(uri), flush=True)
    # Become the MLflow server, so signals (Ctrl+C, kill) reach it and its workers directly.
    command = ui_command(uri, args.host, args.port)
    os.execv(command[0], command)
    return 0  # not reached


def cmd_runs(args: argparse.Namespace) -> int:
    from dlpipe.runs import runs_report, store_uri

    for line in runs_report(store_uri(args.tracking_uri), args.experiment, args.filter, args.limit):
        print(line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dlpipe.runs import compare_report, store_uri

    for line in compare_report(store_uri(args.tracking_uri), args.runs, args.output):
        print(line)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dlpipe.predict import predict_command
    from dlpipe.runs import store_uri

    for line in predict_command(args.model, args.input, args.output,
                                store_uri(args.tracking_uri), args.plugins_dir):
        print(line, flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dlpipe.predict import serve_plan
    from dlpipe.runs import store_uri

    plan = serve_plan(args.model, store_uri(args.tracking_uri), args.host, args.port)
    for line in plan.lines:
        print(line)
    sys.stdout.flush()
    # Become the scoring server, so Ctrl+C and kill reach it directly.
    os.execve(plan.command[0], plan.command, plan.environment)
    return 0  # not reached


def cmd_convert(args: argparse.Namespace) -> int:
    from dlpipe.convert import convert

    convert(
        args.source, args.output, shards=args.shards, image_format=args.image_format,
        image_size=tuple(args.image_size) if args.image_size else None,
        color_mode=args.color_mode, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, x_key=args.x_key, y_key=args.y_key,
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "schema": cmd_schema,
    "ui": cmd_ui,
    "runs": cmd_runs,
    "compare": cmd_compare,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "convert": cmd_convert,
}


def _quiet_broken_pipe() -> int:
    # The reader went away (`dlpipe plugins | head`): stop quietly, like other tools.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --local-workers
    if not args.command:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("DLPIPE_DEBUG") == "1"
    if debug:  # TensorFlow's start-up lines show too (dlpipe.startup); workers inherit it
        os.environ["DLPIPE_DEBUG"] = "1"
    try:
        return COMMANDS[args.command](args)
    except DlpipeError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as exc:  # a full disk while writing a plot, say
        from dlpipe.checkpoint import write_error_reason

        if debug:
            raise
        reason = write_error_reason(exc)
        if reason is None:
            return _unexpected(exc)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: could not write{where}: {reason}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the user asked for no tracebacks
        if debug:
            raise
        return _unexpected(exc)


def _unexpected(exc: BaseException) -> int:
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    print("(run again with --debug for the traceback)", file=sys.stderr)
    return 1
