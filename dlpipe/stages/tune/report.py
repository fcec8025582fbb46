"""After the trials: the study's summary, its trials table and Optuna's plots, logged
to the study's run; and how to open the study in optuna-dashboard."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna

from dlpipe.stages.tune import TuneParams
from dlpipe.stages.tune.lock import tally
from dlpipe.stages.tune.trial import RUN_ID_ATTR, decoded

if TYPE_CHECKING:
    from dlpipe.stages.tune.study import Study


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def short(value: Any) -> str:
    """A sampled value for tags and progress lines."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def dashboard_command(url: str) -> str:
    """The command that opens the study's storage in optuna-dashboard."""
    return f"optuna-dashboard {shlex.quote(hide_password(url))}"


def dashboard_hint(url: str) -> str:
    """How to browse the studies in ``url``, with the install command if needed."""
    hint = f"`{dashboard_command(url)}`"
    if importlib.util.find_spec("optuna_dashboard") is None:
        hint += " (pip install optuna-dashboard)"
    return hint


def summarize(ctx: Any, study: Study) -> None:
    """Log the trial counts, the best trial (or the Pareto front), ``study.json``,
    ``trials.csv`` and the plots to the study's run, and print the result."""
    s = study.study
    trials = s.get_trials(deepcopy=False)
    t = tally(trials)
    counts = {"trials_complete": t.complete, "trials_pruned": t.pruned, "trials_failed": t.failed}
    ctx.tags["optuna.study"] = study.name
    ctx.tags["optuna.storage"] = hide_password(study.url)
    out = ctx.run_dir / "tune"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"study": study.name, "storage": hide_password(study.url), **counts}
    if t.complete == 0:
        print(f"tune: no trial completed ({t.pruned} pruned, {t.failed} failed)", flush=True)
        ctx.log_metrics(counts)
    elif study.multi:
        front = s.best_trials
        summary["pareto_front"] = [
            {"number": b.number, "values": b.values, "params": decoded(b.params)} for b in front
        ]
        ctx.log_metrics({**counts, "pareto_front_size": len(front)})
        print(f"tune: Pareto front of {len(front)} trial(s):", flush=True)
        for b in front:
            vals = ", ".join(f"{o.metric}={v:.5g}" for o, v in zip(study.params.objectives, b.values, strict=False))
            print(f"  trial {b.number}: {vals}  {decoded(b.params)}", flush=True)
    else:
        best = s.best_trial
        assert best.value is not None  # the best trial of a single objective is complete
        metric = study.params.objectives[0].metric
        summary |= {"best_trial": best.number, "best_value": best.value,
                    "best_params": decoded(best.params)}
        # MLflow keeps the params a run started with (the spec's untuned values): the
        # best values go beside them, as metrics where they are numbers and as tags.
        numeric = {f"best.{path}": float(value) for path, value in best.params.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        ctx.log_metrics({**counts, "best_value": float(best.value), f"best_{metric}": float(best.value),
                         "best_trial": best.number, **numeric})
        for path, value in decoded(best.params).items():
            ctx.tags[f"best.{path}"] = short(value)
        run_id = best.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            ctx.tags["optuna.best_run_id"] = run_id
        print(f"tune: best {metric}={best.value:.5g} (trial {best.number}): "
              f"{decoded(best.params)}", flush=True)
    summary_path = out / "study.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    ctx.log_artifact(summary_path, "tune")
    trials_path = out / "trials.csv"
    write_trials_csv(trials, trials_path)
    ctx.log_artifact(trials_path, "tune")
    for filename, figure in study_plots(s, study.params):
        ctx.log_figure(figure, filename, "tune")
    print(f"tune: study {study.name!r}; browse it with {dashboard_hint(study.url)}", flush=True)


def write_trials_csv(trials: list[Any], path: Path) -> None:
    import csv

    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["number", "state", "values", "duration_s", *names, "error"])
        for t in trials:
            duration = t.duration.total_seconds() if t.duration else ""
            w.writerow([t.number, t.state.name, t.values, duration,
                        *[t.params.get(n, "") for n in names], t.user_attrs.get("dlpipe.error", "")])


def study_plots(study: optuna.Study, params: TuneParams) -> Iterator[tuple[str, Any]]:
    """Optuna's matplotlib plots; each is skipped if the study cannot support it yet."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    names = [o.metric for o in params.objectives]
    plots: list[tuple[str, Any]] = []
    if len(names) == 1:
        plots += [
            ("optimization_history.png", lambda: ovm.plot_optimization_history(study, target_name=names[0])),
            ("param_importances.png", lambda: ovm.plot_param_importances(study, target_name=names[0])),
            ("parallel_coordinate.png", lambda: ovm.plot_parallel_coordinate(study, target_name=names[0])),
            ("intermediate_values.png", lambda: ovm.plot_intermediate_values(study)),
        ]
    else:
        plots += [("pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=names))]
        for i, name in enumerate(names):
            plots.append((f"optimization_history_{name}.png",
                          lambda i=i, name=name: ovm.plot_optimization_history(
                              study, target=lambda t: t.values[i], target_name=name)))
    for filename, make in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
        except Exception as exc:  # noqa: BLE001 - e.g. importances need 2+ trials
            print(f"tune: skipped {filename}: {exc}", flush=True)
            continue
        axes = ax.flat[0] if isinstance(ax, np.ndarray) else ax
        yield filename, axes.figure
