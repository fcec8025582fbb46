"""The tune stage: an Optuna study whose trials are nested runs of the earlier stages.

How one ``dlpipe run`` of a spec with a tune stage goes:

1. Open (or create) the study in its storage. The study's name hashes everything it
   depends on except the budget, so re-running the spec resumes it
   (:mod:`~dlpipe.stages.tune.study`).
2. Run the leading stages that prepare data (their registration provides ``data``)
   once, unless the search space touches them.
3. Until the study holds ``n_trials`` trials (or ``timeout`` passes): take a trial,
   write its sampled values into a copy of the spec by their dotted paths, and run the
   remaining earlier stages as a nested run (MLflow: a child run). Each epoch is
   reported to the pruner; a pruned trial stops at once (:mod:`~dlpipe.stages.tune.trial`).
4. Log the best values, the trial counts and Optuna's plots to the study's run
   (:mod:`~dlpipe.stages.tune.report`), and with ``refit: true`` retrain the best
   configuration on train+val (:mod:`~dlpipe.stages.tune.refit`).

Several processes may share a study: ``--workers N`` starts N-1 more
(:mod:`~dlpipe.stages.tune.workers`), and separate ``dlpipe run`` commands on the same
spec and storage join it, on this machine or, with a PostgreSQL storage, on others.
Trials are counted under a lock that lives in the study's database
(:mod:`~dlpipe.stages.tune.lock`), so together they run exactly ``n_trials``. Each
trial's sampler is seeded from the seed and the trial's number, so no two processes
draw the same trials. A worker that dies stops sending heartbeats; another worker then
marks its trial failed and runs it again.
"""

from __future__ import annotations

from typing import Any

import optuna

from dlpipe.stages.tune import TuneParams
from dlpipe.stages.tune.refit import refit
from dlpipe.stages.tune.report import summarize
from dlpipe.stages.tune.study import Study, study_name
from dlpipe.stages.tune.workers import worker_processes


def optuna_tune(ctx: Any, params: TuneParams) -> None:
    """The ``tune/optuna`` stage."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if ctx.smoke:
        params = smoke_params(ctx, params)
    study = Study(ctx, params)
    with worker_processes(ctx, params, study.target, study.worker):
        study.run()
    if study.worker:
        ctx.finished = True  # a worker only runs trials; the main process sums up
        return
    summarize(ctx, study)
    if params.refit:
        refit(ctx, study)


def smoke_params(ctx: Any, params: TuneParams) -> TuneParams:
    """For ``--smoke``: two in-process trials in a study of their own."""
    name = f"{params.study_name or study_name(ctx.spec, ctx.stage)}-smoke"
    return params.model_copy(
        update={"n_trials": min(params.n_trials, 2), "workers": 1, "timeout": None,
                "study_name": name})
