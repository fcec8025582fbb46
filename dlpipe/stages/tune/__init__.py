"""The built-in tune stage: an Optuna study over the stages before it.

A ``tune`` stage names its search space by the dotted paths ``--set`` uses::

    - kind: tune
      use: optuna
      params:
        space:
          train.optimizer.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
          train.loss_weights.kl: {type: float, low: 0.2, high: 4}
          model.latent_dim: {type: int, low: 2, high: 8, step: 2}
        objective: {metric: val_loss, direction: minimize}
        n_trials: 20

Each trial runs the earlier stages with the sampled values as a nested run; the stages
that prepare data (registered as providing ``data``) run once. The stage is registered
with ``runs_previous=True``, so the engine hands it those stages instead of running
them itself. The code starts in :mod:`dlpipe.stages.tune.stage`; this module stays
light (no Optuna, no TensorFlow).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params

#: ``context.extras`` key of the running trial (set on a trial's nested run).
TRIAL_KEY = "dlpipe.tune.trial"


class FloatDistribution(Params):
    """A float between ``low`` and ``high``, uniform or on a log scale."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: float | None = Field(None, gt=0, description="Discretise to multiples of step.")

    @model_validator(mode="after")
    def _check(self) -> FloatDistribution:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def samples(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        if self.step is None:
            return None
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class IntDistribution(Params):
    """An integer between ``low`` and ``high`` (inclusive), in steps of ``step``."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = Field(False, description="Sample on a log scale (step must be 1).")

    @model_validator(mode="after")
    def _check(self) -> IntDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("a log-scale int range needs low > 0 and step 1")
        return self

    def samples(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        return list(range(self.low, self.high + 1, self.step))


class CategoricalDistribution(Params):
    """One of ``choices``; any YAML values (lists too, such as layer widths)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    def samples(self) -> list[Any]:
        return list(self.choices)

    def grid(self) -> list[Any] | None:
        return list(self.choices)


Distribution = Annotated[
    FloatDistribution | IntDistribution | CategoricalDistribution, Field(discriminator="type")
]


class Objective(Params):
    metric: str = Field(description="A metric the trial reports: val_loss, val_accuracy, test_loss...")
    direction: Literal["minimize", "maximize"] = "minimize"
    summary: Literal["best", "last"] = Field(
        "best",
        description="For per-epoch metrics: the best epoch's value (the weights the "
        "checkpoint keeps) or the last epoch's.",
    )


class TuneParams(Params):
    """An Optuna study: search space, objective(s), sampler, pruner and budget."""

    space: dict[str, Distribution] = Field(
        min_length=1,
        description="Dotted path (as for --set) -> distribution: {type: float, low, high, "
        "log}, {type: int, low, high, step} or {type: categorical, choices}.",
    )
    objective: Objective | list[Objective] = Field(
        description="One {metric, direction}, or a list of them for a multi-objective study."
    )
    sampler: Literal["tpe", "random", "cmaes", "grid", "nsga2"] | None = Field(
        None, description="Default: tpe, or nsga2 for several objectives."
    )
    pruner: Literal["median", "hyperband", "successive_halving", "none"] | None = Field(
        None, description="Default: median, or none for several objectives."
    )
    prune_on: str | None = Field(
        None, description="Per-epoch metric the pruner watches. Default: the objective's."
    )
    n_trials: int = Field(
        20, ge=1,
        description="Trials this run adds to the study. Processes that run the same spec "
        "at the same time (and --workers) share them; a re-run after an interruption "
        "finishes the round first.",
    )
    timeout: float | None = Field(
        None, gt=0, description="Stop starting trials after this many seconds (per run)."
    )
    refit: bool = Field(
        False, description="Retrain the best configuration on train+val and log that model."
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL. Default: $DLPIPE_OPTUNA_STORAGE, else "
        "sqlite:///mlruns/optuna.db.",
    )
    study_name: str | None = Field(
        None, description="Default: the spec's name plus a hash of what the study depends on."
    )
    workers: int = Field(1, ge=1, description="Processes sharing the study (--workers).")
    seed: int | None = Field(None, description="Sampler seed. Default: the pipeline's seed.")
    startup_trials: int = Field(
        5, ge=0, description="Random trials before TPE models the space and the median pruner acts."
    )
    warmup_epochs: int = Field(2, ge=0, description="Epochs before the median pruner may prune.")
    heartbeat_interval: int = Field(
        10, ge=1, description="Seconds between a running trial's heartbeats."
    )
    grace_period: int | None = Field(
        None, ge=1,
        description="Seconds without a heartbeat before a trial counts as dead, is marked "
        "failed and retried. Default: 3 heartbeats.",
    )
    max_retries: int = Field(2, ge=0, description="Retries of a trial whose worker died.")

    @property
    def objectives(self) -> list[Objective]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        multi = len(self.objectives) > 1
        if not self.objectives:
            raise ValueError("objective needs at least one {metric, direction}")
        if multi and self.pruner not in (None, "none"):
            raise ValueError("pruning needs a single objective; use pruner: none")
        if multi and self.sampler == "cmaes":
            raise ValueError("cmaes optimises a single objective; use nsga2 or tpe")
        if self.sampler == "grid":
            missing = [p for p, d in self.space.items() if d.grid() is None]
            if missing:
                raise ValueError(
                    f"the grid sampler needs a step (or choices) for {', '.join(missing)}"
                )
        return self

    def spec_references(self) -> Mapping[str, Sequence[Any]]:
        return {path: dist.samples() for path, dist in self.space.items()}

    def budget_free(self) -> dict[str, Any]:
        """What identifies the study: everything but budget and parallelism."""
        data = self.model_dump(mode="json")
        for key in ("n_trials", "timeout", "refit", "workers", "storage", "study_name",
                    "heartbeat_interval", "grace_period", "max_retries"):
            data.pop(key, None)
        return json.loads(json.dumps(data, sort_keys=True))


@hookimpl
def register_stages(register):
    register(
        "tune",
        "optuna",
        run="dlpipe.stages.tune.stage:optuna_tune",
        params=TuneParams,
        description="Optuna study over the earlier stages: pruning, nested MLflow runs, "
        "resumable and parallel.",
        runs_previous=True,
    )


# A trial's hooks. The trial object lives in its nested run's context; these calls do
# nothing for any other run.


@hookimpl(trylast=True)
def on_metrics(context, stage, metrics, step):
    """Report each epoch to the pruner (after tracking logged it); may stop the trial.
    Also records the trial's MLflow run id in the trial, once tracking knows it."""
    trial = context.extras.get(TRIAL_KEY)
    if trial is not None and step is not None:
        trial.note_run_id(context)
        trial.report_epoch(metrics, step)


@hookimpl(tryfirst=True)
def after_run(context):
    """Compute the trial's objective and state before tracking closes its run."""
    trial = context.extras.get(TRIAL_KEY)
    if trial is not None:
        trial.finish(context, None)


@hookimpl(tryfirst=True)
def on_run_error(context, error):
    trial = context.extras.get(TRIAL_KEY)
    if trial is not None:
        trial.finish(context, error)
