"""Looking back at tracked runs: ``dlpipe runs``, ``dlpipe compare``, and the links that
``dlpipe run`` and ``dlpipe ui`` print.

Every command reads the store dlpipe writes to (:func:`store_uri`), so nothing has to
be exported. MLflow is imported only inside the functions that need it; the links are
read from a SQLite store with :mod:`sqlite3` directly, so that ``dlpipe run`` does not
import MLflow into the training process just to print one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import sqlite3
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.errors import DlpipeError, close_matches

#: Where ``dlpipe ui`` serves by default; the links printed elsewhere point there.
UI_HOST = "127.0.0.1"
UI_PORT = 5000

#: MLflow 3 opens experiments in its GenAI view; this query lands on the classic
#: training view (runs, params, metric charts).
ML_VIEW = "workflowType=machine_learning"

#: The metric a run is summarised by, in order of preference; else its first test_*.
KEY_METRICS = ("test_accuracy", "test_loss")

#: Per-epoch metrics that are not learning curves.
NOT_CURVES = {"epoch_time_s", "learning_rate"}

#: ``dlpipe runs`` shows at most this many differing params as columns.
MAX_PARAM_COLUMNS = 6

#: The end-of-run summary shows at most this many test metrics.
SUMMARY_TEST_METRICS = 8


# --------------------------------------------------------------------------------------
# The store and links into the UI
# --------------------------------------------------------------------------------------


def store_uri(tracking_uri: str | None = None) -> str:
    """The store the commands read: ``--tracking-uri``, else where ``dlpipe run`` writes."""
    return paths.absolute_sqlite(tracking_uri) if tracking_uri else paths.default_tracking_uri()


def cli_hint(uri: str) -> str:
    """How MLflow's own command line reaches the same store."""
    return f"MLflow CLI: export MLFLOW_TRACKING_URI={uri}"


def experiment_url(experiment_id: str, host: str = UI_HOST, port: int = UI_PORT) -> str:
    return f"http://{host}:{port}/#/experiments/{experiment_id}?{ML_VIEW}"


def run_url(experiment_id: str, run_id: str, host: str = UI_HOST, port: int = UI_PORT) -> str:
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


class _NoSqlite(Exception):
    """The store is not a SQLite file this module can read directly."""


def _sqlite_row(uri: str, query: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    """One row from a SQLite store, read-only; ``None`` when the query finds nothing.
    Raises :class:`_NoSqlite` when the store is not a readable SQLite file."""
    db = paths.sqlite_file(uri)
    if db is None or not db.is_file():
        raise _NoSqlite(uri)
    try:
        with contextlib.closing(
            sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
        ) as con:
            row = con.execute(query, tuple(args)).fetchone()
    except sqlite3.Error as exc:
        raise _NoSqlite(uri) from exc
    return None if row is None else tuple(row)


def experiment_of_run(uri: str, run_id: str) -> str | None:
    """The experiment id of a run, or ``None`` if the store cannot say."""
    try:
        row = _sqlite_row(uri, "SELECT experiment_id FROM runs WHERE run_uuid = ?", [run_id])
        return None if row is None else str(row[0])
    except _NoSqlite:
        pass
    try:
        return str(open_store(uri).get_run(run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - a link is a nicety; never fail over it
        return None


def latest_experiment(uri: str) -> tuple[str, str] | None:
    """``(id, name)`` of the experiment of the most recent run, or ``None`` without runs."""
    try:
        row = _sqlite_row(
            uri,
            "SELECT e.experiment_id, e.name FROM runs r "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active' "
            "ORDER BY r.start_time DESC LIMIT 1",
        )
        return None if row is None else (str(row[0]), str(row[1]))
    except _NoSqlite:
        if paths.sqlite_file(uri) is not None:
            return None  # no store file yet (or not SQLite): no runs to point at
    try:
        client = open_store(uri)
        runs = client.search_runs(_experiment_ids(client), max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        exp_id = str(runs[0].info.experiment_id)
        return exp_id, str(client.get_experiment(exp_id).name)
    except Exception:  # noqa: BLE001 - a link is a nicety
        return None


def open_store(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``. A SQLite store must exist and be SQLite: reading
    must not create an empty store, or paper over a damaged one."""
    from dlpipe.tracking import check_store_file

    db = paths.sqlite_file(uri)
    if db is not None and not db.exists():
        raise DlpipeError(
            f"no runs yet: the tracking store {db} does not exist.\n"
            "    Train something first (dlpipe run pipelines/xor.yaml), run this from the "
            "folder you trained in, or pass --tracking-uri"
        )
    check_store_file(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_ids(client: Any) -> list[str]:
    return [str(e.experiment_id) for e in client.search_experiments()]


# --------------------------------------------------------------------------------------
# Summaries of runs
# --------------------------------------------------------------------------------------


def key_metric(metrics: Mapping[str, float]) -> str | None:
    """The metric a run is judged by: test accuracy, test loss, else its first test_*."""
    for name in KEY_METRICS:
        if name in metrics:
            return name
    tests = sorted(k for k in metrics if k.startswith("test_"))
    return tests[0] if tests else None


def differing_params(param_sets: Sequence[Mapping[str, str]]) -> list[str]:
    """Params whose value is not the same in every run (missing counts as a value);
    those every run has come first."""
    keys = {k for params in param_sets for k in params}
    differ = [k for k in keys if len({params.get(k) for params in param_sets}) > 1]
    return sorted(differ, key=lambda k: (sum(k not in p for p in param_sets), k))


def format_value(value: Any, width: int = 24) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_start(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def run_duration(info: Any, now: float | None = None) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or (now if now is not None else time.time()) * 1000
    return format_duration(max(end - info.start_time, 0) / 1000)


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in table]


def short_id(run_id: str) -> str:
    return run_id[:8]


# --------------------------------------------------------------------------------------
# dlpipe runs
# --------------------------------------------------------------------------------------


def find_runs(client: Any, uri: str, experiment: str | None, filter_string: str | None,
              limit: int) -> list[Any]:
    """The newest ``limit`` runs, of one experiment or all, matching ``filter_string``."""
    from mlflow.exceptions import MlflowException

    if limit < 1:
        raise DlpipeError(f"--limit {limit}: expected a number of runs >= 1")
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            hint = close_matches(experiment, names)
            known = f"; experiments there: {', '.join(sorted(names))}" if names else ""
            close = f"; did you mean: {', '.join(hint)}" if hint else ""
            raise DlpipeError(f"--experiment {experiment}: no such experiment in {uri}"
                              f"{close or known}")
        ids = [str(found.experiment_id)]
    else:
        ids = _experiment_ids(client)
    try:
        return list(client.search_runs(
            ids, filter_string or "", max_results=limit,
            order_by=["attributes.start_time DESC"],
        ))
    except MlflowException as exc:
        message = str(exc.message).strip().splitlines()[0]
        raise DlpipeError(
            f"--filter {filter_string!r}: {message}\n"
            "    MLflow's search syntax, e.g. \"metrics.test_accuracy > 0.9\", "
            "\"params.train.epochs = '3'\", \"attributes.status = 'FINISHED'\""
        ) from None


def runs_table(runs: Sequence[Any]) -> tuple[list[str], list[str], list[str]]:
    """The table of ``dlpipe runs``, the differing params it shows, and those left out
    of it for width."""
    keys = {key_metric(r.data.metrics) for r in runs}
    shared_key = keys.pop() if len(keys) == 1 else None
    params = differing_params([r.data.params for r in runs])
    shown, hidden = params[:MAX_PARAM_COLUMNS], params[MAX_PARAM_COLUMNS:]
    header = ["run", "name", "status", "start", "duration",
              shared_key or "key metric", *shown]
    now = time.time()
    rows = []
    for run in runs:
        metrics = run.data.metrics
        if shared_key is not None:
            metric = format_value(metrics.get(shared_key))
        else:
            name = key_metric(metrics)
            metric = f"{name}={metrics[name]:.4g}" if name else "-"
        rows.append([
            short_id(run.info.run_id),
            format_value(run.info.run_name),
            run.info.status,
            format_start(run.info.start_time),
            run_duration(run.info, now),
            metric,
            *[format_value(run.data.params.get(k), 18) for k in shown],
        ])
    return format_table(header, rows), shown, hidden


def runs_report(uri: str, experiment: str | None = None, filter_string: str | None = None,
                limit: int = 20) -> list[str]:
    """What ``dlpipe runs`` prints."""
    client = open_store(uri)
    runs = find_runs(client, uri, experiment, filter_string, limit)
    where = f"experiment {experiment!r} in {uri}" if experiment else uri
    matching = f" matching {filter_string!r}" if filter_string else ""
    if not runs:
        return [f"no runs{matching} in {where}", cli_hint(uri)]
    lines = [f"runs{matching} in {where}, newest first:"]
    table, shown, hidden = runs_table(runs)
    lines += table
    if len(runs) > 1 and not shown:
        lines.append("(these runs have the same params)")
    if hidden:
        lines.append(f"(+{len(hidden)} more params differ: {', '.join(hidden[:4])}"
                     f"{', ...' if len(hidden) > 4 else ''}; dlpipe compare lists them all)")
    if len(runs) == limit:
        lines.append(f"(the newest {limit} runs; --limit N shows more)")
    lines.append(f"compare: dlpipe compare {' '.join(short_id(r.info.run_id) for r in runs[:2])}"
                 if len(runs) > 1 else f"predict: dlpipe predict {short_id(runs[0].info.run_id)} INPUT")
    lines.append(cli_hint(uri))
    return lines


# --------------------------------------------------------------------------------------
# dlpipe compare
# --------------------------------------------------------------------------------------


def all_runs(client: Any) -> list[Any]:
    """Every active run in the store, newest first."""
    ids = _experiment_ids(client)
    found: list[Any] = []
    token = None
    while ids:
        page = client.search_runs(ids, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        found.extend(page)
        token = page.token
        if not token:
            break
    return found


@dataclass
class RunResolver:
    """Finds runs by id, ``runs:/`` URI, unique id prefix or name (the newest of that
    name). Lists the store once, on the first reference that is not a full id."""

    client: Any
    uri: str
    notes: list[str] = field(default_factory=list)
    _runs: list[Any] | None = None

    def listing(self) -> list[Any]:
        if self._runs is None:
            self._runs = all_runs(self.client)
        return self._runs

    def resolve(self, ref: str) -> Any:
        from mlflow.exceptions import MlflowException

        text = ref.strip()
        match = re.fullmatch(r"runs:/([0-9a-f]{32})(/.*)?", text)
        if match:
            text = match.group(1)
        if re.fullmatch(r"[0-9a-f]{32}", text):
            try:
                return self.client.get_run(text)
            except MlflowException:
                raise DlpipeError(f"{ref}: no such run in {self.uri}") from None
        runs = self.listing()
        if re.fullmatch(r"[0-9a-f]+", text):
            by_id = [r for r in runs if r.info.run_id.startswith(text)]
            if len(by_id) == 1:
                return by_id[0]
            if len(by_id) > 1:
                choices = ", ".join(
                    f"{r.info.run_id[:12]} ({r.info.run_name})" for r in by_id[:5])
                raise DlpipeError(f"{ref}: {len(by_id)} runs have ids starting so; "
                                  f"give more of the id: {choices}")
        by_name = [r for r in runs if r.info.run_name == text]
        if by_name:
            if len(by_name) > 1:
                self.notes.append(f"{ref}: {len(by_name)} runs are named so; using the newest, "
                                  f"{short_id(by_name[0].info.run_id)} "
                                  f"({format_start(by_name[0].info.start_time)})")
            return by_name[0]
        names = sorted({str(r.info.run_name) for r in runs if r.info.run_name})
        hint = close_matches(text, names)
        tail = f"; did you mean: {', '.join(hint)}" if hint else \
            "; dlpipe runs lists the runs"
        raise DlpipeError(f"{ref}: no run with this id, id prefix or name in {self.uri}{tail}")


def metric_order(name: str) -> tuple[int, str]:
    """Test metrics first, then the best-epoch record, then the last epoch's."""
    if name.startswith("test_"):
        return 0, name
    if name.startswith("best_"):
        return 1, name
    return 2, name


def compare_table(runs: Sequence[Any]) -> list[str]:
    """Params that differ and final metrics, one column per run."""
    header = ["run", *[short_id(r.info.run_id) for r in runs]]
    rows = [
        ["name", *[format_value(r.info.run_name) for r in runs]],
        ["status", *[r.info.status for r in runs]],
        ["start", *[format_start(r.info.start_time) for r in runs]],
        ["duration", *[run_duration(r.info) for r in runs]],
    ]
    params = differing_params([r.data.params for r in runs])
    sections = [("params that differ:", len(rows))]
    if not params:
        rows.append(["  (none: every param is the same)", *["" for _ in runs]])
    for key in params:
        rows.append([f"  {key}", *[format_value(r.data.params.get(key)) for r in runs]])
    sections.append(("final metrics:", len(rows)))
    metrics = sorted({k for r in runs for k in r.data.metrics}, key=metric_order)
    for key in metrics:
        rows.append([f"  {key}", *[format_value(r.data.metrics.get(key)) for r in runs]])
    table = format_table(header, rows)
    # Section titles go between the rows (header is table[0], so row i is table[i + 1]).
    for title, at in reversed(sections):
        table.insert(at + 1, title)
    return table


def learning_curves(client: Any, run: Any) -> dict[str, tuple[list[int], list[float]]]:
    """A run's per-epoch metrics with at least two points: ``{name: (epochs, values)}``."""
    curves = {}
    for key in sorted(run.data.metrics):
        if key.startswith(("test_", "best_")) or key in NOT_CURVES:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, key),
                         key=lambda m: (m.step, m.timestamp))
        if len(history) >= 2:
            curves[key] = ([m.step + 1 for m in history], [m.value for m in history])
    return curves


def curves_figure(labels: Sequence[str], curves: Sequence[Mapping[str, Any]]) -> tuple[Any, list[str]]:
    """One panel per metric (loss first), one colour per run; validation dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = sorted({k.removeprefix("val_") for c in curves for k in c},
                    key=lambda k: (k != "loss", k))
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(labels))]
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, color, run_curves in zip(labels, colors, curves, strict=True):
            for key, style, suffix in ((panel, "-", ""), (f"val_{panel}", "--", " (val)")):
                if key in run_curves:
                    epochs, values = run_curves[key]
                    ax.plot(epochs, values, style, color=color, marker="o", ms=2.5,
                            label=label + suffix)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("learning curves (solid: training, dashed: validation)", fontsize=10)
    fig.tight_layout()
    return fig, panels


def compare_report(uri: str, refs: Sequence[str], output: str | Path = "compare.png") -> list[str]:
    """What ``dlpipe compare`` prints; writes the learning-curve overlay to ``output``."""
    if len(refs) < 2:
        raise DlpipeError("compare needs at least two runs (ids, id prefixes or names); "
                          "dlpipe runs lists them")
    client = open_store(uri)
    resolver = RunResolver(client, uri)
    runs: list[Any] = []
    for ref in refs:
        run = resolver.resolve(ref)
        if all(r.info.run_id != run.info.run_id for r in runs):
            runs.append(run)
    if len(runs) < 2:
        raise DlpipeError(f"{' and '.join(refs)} are the same run "
                          f"({runs[0].info.run_id}); compare needs two different runs")
    lines = [*resolver.notes, *compare_table(runs)]
    labels = [f"{r.info.run_name} ({short_id(r.info.run_id)})" for r in runs]
    curves = [learning_curves(client, r) for r in runs]
    if not any(curves):
        lines.append("no learning curves to plot: these runs logged no per-epoch metrics")
    else:
        fig, panels = curves_figure(labels, curves)
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        lines.append(f"wrote {out} (learning curves: {', '.join(panels)})")
    lines.append(cli_hint(uri))
    return lines


# --------------------------------------------------------------------------------------
# The end of dlpipe run
# --------------------------------------------------------------------------------------


def _wrapped(label: str, text: str) -> list[str]:
    lead = f"  {label:<11} "
    return textwrap.wrap(text, width=96, initial_indent=lead,
                         subsequent_indent=" " * len(lead)) or [lead.rstrip()]


def run_summary(ctx: Any, uri: str | None) -> list[str]:
    """What ``dlpipe run`` prints after a run: where to look and what came out.

    ``uri`` is the tracking store, or ``None`` when the run was not tracked.
    """
    metrics: Mapping[str, float] = ctx.metrics
    run_dir = Path(ctx.run_dir)
    lines = []
    if "best_epoch" in metrics:
        monitored = [(k, v) for k, v in metrics.items()
                     if k.startswith("best_") and k != "best_epoch"]
        value = f" ({monitored[0][0].removeprefix('best_')} {monitored[0][1]:.4g})" \
            if monitored else ""
        lines.append(f"  {'best epoch':<11} {int(metrics['best_epoch'])}{value}")
    tests = [k for k in metrics if k.startswith("test_")]
    # Per-class metrics (test_recall_3) stay in MLflow: the summary is a glance.
    shown = [k for k in tests if not re.search(r"_\d+$", k)][:SUMMARY_TEST_METRICS]
    if tests:
        text = ", ".join(f"{k.removeprefix('test_')}={metrics[k]:.4g}" for k in shown)
        more = len(tests) - len(shown)
        lines += _wrapped("test", text + (f" (+{more} more in MLflow)" if more else ""))
    plots = sorted((run_dir / "plots").glob("*.png"))
    if plots:
        lines.append(f"  {'plots':<11} {run_dir / 'plots'} ({len(plots)} PNG)")
    model = run_dir / "model" / "model.keras"
    if model.is_file():
        lines.append(f"  {'model':<11} {model}")
    elif (run_dir / "model").is_dir():
        lines.append(f"  {'model':<11} {run_dir / 'model'}")
    if uri is not None and ctx.run_id:
        experiment_id = experiment_of_run(uri, ctx.run_id)
        if experiment_id is not None:
            lines.append(f"  {'run':<11} {run_url(experiment_id, ctx.run_id)}  (after `dlpipe ui`)")
        lines.append(f"  {'predict':<11} dlpipe predict {short_id(ctx.run_id)} INPUT")
    return lines
