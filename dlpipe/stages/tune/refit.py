"""``refit: true``: retrain the best configuration on train+val in the study's own run."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.trial import TrialState

from dlpipe.engine import run_stage
from dlpipe.stages.tune.study import derive_spec, prepares_data, reset_backend
from dlpipe.stages.tune.trial import decoded

if TYPE_CHECKING:
    from dlpipe.stages.tune.study import Study


def merged_train_val(data: Any) -> Any:
    """The bundle with the validation split folded into training (for the refit)."""
    def join(a: Any, b: Any) -> Any:
        if a is None or b is None:
            return a
        if isinstance(a, dict):
            return {k: join(a[k], b[k]) for k in a}
        if isinstance(a, (tuple, list)):
            return type(a)(join(x, y) for x, y in zip(a, b, strict=True))
        return np.concatenate([a, b])

    def empty(a: Any) -> Any:
        if a is None:
            return None
        if isinstance(a, dict):
            return {k: empty(v) for k, v in a.items()}
        if isinstance(a, (tuple, list)):
            return type(a)(empty(v) for v in a)
        return a[:0]

    x = dict(data.x)
    y = dict(data.y)
    if "val" in x and data.size("val"):
        x["train"], y["train"] = join(x["train"], x["val"]), join(y["train"], y.get("val"))
        x["val"], y["val"] = empty(x["val"]), empty(y.get("val"))
    return replace(data, x=x, y=y)


def refit(ctx: Any, study: Study) -> None:
    """Retrain the best configuration on train+val in the study's own run: the stages
    the trials ran, from the data prepared once, merged again after each stage that
    prepares data."""
    s = study.study
    if not any(t.state == TrialState.COMPLETE for t in s.get_trials(deepcopy=False)):
        print("tune: nothing to refit, no trial completed", flush=True)
        return
    if study.multi:
        best = min(s.best_trials, key=lambda b: b.values[0] * (1 if study.params.objectives[0].direction == "minimize" else -1))
        print(f"tune: refitting Pareto trial {best.number} (best {study.params.objectives[0].metric})", flush=True)
    else:
        best = s.best_trial
    values = decoded(best.params)
    registry = ctx.plugins.registry
    spec = derive_spec(study.spec, registry, values, trial=False)
    print(f"tune: refitting trial {best.number}'s configuration on train+val: {values}", flush=True)
    ctx.tags["dlpipe.refit_trial"] = str(best.number)
    if study.base_data is not None:
        ctx.data = merged_train_val(study.base_data)
    reset_backend(spec.settings.seed)
    for stage in spec.stages[len(study.prefix) : study.stage.index]:
        run_stage(ctx, stage)
        if prepares_data(registry, stage):
            ctx.data = merged_train_val(ctx.data)
