"""One trial as its nested run sees it: sampled values, epoch reports, objective, state.

The hooks in :mod:`dlpipe.stages.tune` reach the :class:`TrialRun` through the nested
run's ``context.extras``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import optuna

from dlpipe.errors import DlpipeError, RunStopped
from dlpipe.stages.tune import TuneParams

#: The trial's user attribute that names its MLflow run (the child run of the study's).
RUN_ID_ATTR = "mlflow_run_id"


@dataclass
class TrialRun:
    """Links one Optuna trial to its nested run: epoch reports, objective, state."""

    trial: optuna.Trial
    params: TuneParams
    prune_metric: str | None
    values: list[float] | None = None
    error: str | None = None
    state: str = "RUNNING"
    pruned_at: int | None = None
    run_id: str | None = None

    def note_run_id(self, ctx: Any) -> None:
        """Record the trial's MLflow run in the trial (user attr :data:`RUN_ID_ATTR`),
        as soon as tracking knows its id; Optuna's dashboard shows it beside the trial."""
        tracker = ctx.extras.get("mlflow")
        if self.run_id is not None or tracker is None:
            return
        run_id = tracker.run_id  # does not wait for the store
        if run_id is not None:
            self.run_id = run_id
            self.trial.set_user_attr(RUN_ID_ATTR, run_id)

    def report_epoch(self, metrics: Any, step: int) -> None:
        if self.prune_metric is None or self.prune_metric not in metrics:
            return
        value = float(metrics[self.prune_metric])
        if not math.isfinite(value):
            return  # the train stage's NaN guard ends the trial as failed
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            raise RunStopped(
                f"trial {self.trial.number} pruned after epoch {step + 1}: "
                f"{self.prune_metric}={value:.5g}"
            )

    def finish(self, ctx: Any, error: BaseException | None) -> None:
        """Called from the nested run's ``after_run`` / ``on_run_error`` hooks."""
        self.note_run_id(ctx)
        if error is None:
            try:
                self.values = [objective_value(ctx, o) for o in self.params.objectives]
            except DlpipeError as exc:
                self.error = str(exc)
                self.state = "FAIL"
            else:
                self.state = "COMPLETE"
                ctx.log_metrics({f"objective_{i}" if len(self.values) > 1 else "objective": v
                                 for i, v in enumerate(self.values)})
        elif isinstance(error, RunStopped):
            self.state = "PRUNED"
        elif isinstance(error, KeyboardInterrupt):
            self.state = "INTERRUPTED"
        else:
            self.state = "FAIL"
            self.error = f"{type(error).__name__}: {error}"
        ctx.tags["optuna.trial_state"] = self.state
        if self.error:
            ctx.tags["optuna.fail_reason"] = self.error[:4000]


def objective_value(ctx: Any, objective: Any) -> float:
    """The trial's value of one objective: from the epoch history or final metrics."""
    history = ctx.history.get(objective.metric)
    if history:
        finite = [v for v in history if math.isfinite(v)]
        if objective.summary == "last" or not finite:
            return float(history[-1])
        return float(min(finite) if objective.direction == "minimize" else max(finite))
    if objective.metric in ctx.metrics:
        return float(ctx.metrics[objective.metric])
    known = sorted({*ctx.history, *ctx.metrics})
    raise DlpipeError(
        f"the objective metric {objective.metric!r} was not reported by the trial; "
        f"reported: {', '.join(known) or 'nothing'}"
    )


# Optuna's categorical choices must be None, bool, int, float or str; other YAML values
# (a list of layer widths) travel as JSON text and are decoded for the spec.
def encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "json:" + json.dumps(value)


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


def decoded(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params with the JSON-encoded choices decoded."""
    return {k: decode(v) for k, v in params.items()}


def suggest(trial: optuna.Trial, params: TuneParams) -> dict[str, Any]:
    """Sample the search space: dotted path -> value for the spec."""
    values: dict[str, Any] = {}
    for path, dist in params.space.items():
        if dist.type == "float":
            values[path] = trial.suggest_float(path, dist.low, dist.high, log=dist.log, step=dist.step)
        elif dist.type == "int":
            values[path] = trial.suggest_int(path, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[path] = decode(trial.suggest_categorical(path, [encode(c) for c in dist.choices]))
    return values
