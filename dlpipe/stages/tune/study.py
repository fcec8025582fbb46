"""The tune stage: an Optuna study whose trials are nested runs of the earlier stages.

How one ``dlpipe run`` of a spec with a tune stage goes:

1. Open (or create) the study in its storage. The study's name hashes everything it
   depends on except the budget, so re-running the spec resumes it.
2. Run the data stages once, unless the search space touches them.
3. Until the study holds ``n_trials`` trials (or ``timeout`` passes): take a trial,
   write its sampled values into a copy of the spec by their dotted paths, and run the
   remaining earlier stages as a nested run (MLflow: a child run). Each epoch is
   reported to the pruner; a pruned trial stops at once.
4. Log the best values, the trial counts and Optuna's plots to the study's run, and
   with ``refit: true`` retrain the best configuration on train+val.

Several processes may share a study: ``--workers N`` starts N-1 more, and separate
``dlpipe run`` commands on the same spec and storage join it. Trials are counted under
a lock, so together they run exactly ``n_trials``. A worker that dies stops sending
heartbeats; another worker then marks its trial failed and runs it again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from dlpipe import paths
from dlpipe.engine import run_nested, run_stage
from dlpipe.errors import DlpipeError, RunStopped
from dlpipe.spec import ResolvedSpec, ResolvedStage, YamlDocument, resolve_path, set_path, validate
from dlpipe.stages.tune import TRIAL_KEY, TuneParams

#: Where the study is stored when neither the spec nor this variable says.
STORAGE_ENV = "DLPIPE_OPTUNA_STORAGE"
#: Set (to the worker's number) in the processes that ``--workers`` starts.
WORKER_ENV = "DLPIPE_TUNE_WORKER"
#: The number of trials the study should reach, passed to those workers.
TARGET_ENV = "DLPIPE_TUNE_TARGET"
#: Stage kinds that only prepare data: run once per process, not once per trial.
DATA_KINDS = ("data",)
#: The trial's user attribute that names its MLflow run (the child run of the study's).
RUN_ID_ATTR = "mlflow_run_id"


# --------------------------------------------------------------------------------------
# A trial, as its nested run sees it (through the hooks in dlpipe.stages.tune)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Study set-up
# --------------------------------------------------------------------------------------


def storage_url(params: TuneParams) -> str:
    url = params.storage or os.environ.get(STORAGE_ENV)
    if url:
        return paths.absolute_sqlite(url) if url.startswith("sqlite:") else url
    db = (paths.home() / "optuna.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def study_name(spec: ResolvedSpec, stage: ResolvedStage) -> str:
    """``<spec name>-<hash>``: the hash covers the spec (tracking and the tune stage's
    budget excluded), so a changed space or model starts a new study."""
    params: TuneParams = stage.params  # type: ignore[assignment]
    if params.study_name:
        return params.study_name
    full = spec.resolved_dict()
    full.pop("tracking", None)
    full["stages"][stage.index]["params"] = params.budget_free()
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-") or "study"
    return f"{slug}-{digest[:10]}"


def make_storage(url: str, params: TuneParams) -> Any:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental
        callback = (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=params.max_retries)
        kwargs: dict[str, Any] = {
            "heartbeat_interval": params.heartbeat_interval,
            "grace_period": params.grace_period or 3 * params.heartbeat_interval,
        }
        if retry is not None:
            kwargs["heartbeat_stale_trial_callback"] = callback
        else:
            kwargs["failed_trial_callback"] = callback
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as exc:
            raise DlpipeError(
                f"cannot open the Optuna storage {url!r}: {type(exc).__name__}: {exc}\n"
                f"    set tune params.storage or ${STORAGE_ENV} to a reachable database URL"
            ) from None


def name_metrics(study: optuna.Study, names: list[str]) -> None:
    """Name the objectives in the study, so that Optuna's dashboard shows
    ``val_accuracy`` instead of ``Objective 0``."""
    if study.metric_names == names:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is marked experimental
        study.set_metric_names(names)


def dashboard_command(url: str) -> str:
    """The command that opens the study's storage in optuna-dashboard."""
    return f"optuna-dashboard {shlex.quote(_hide_password(url))}"


def dashboard_hint(url: str) -> str:
    """How to browse the studies in ``url``, with the install command if needed."""
    hint = f"`{dashboard_command(url)}`"
    if importlib.util.find_spec("optuna_dashboard") is None:
        hint += " (pip install optuna-dashboard)"
    return hint


def make_sampler(params: TuneParams, seed: int) -> Any:
    samplers = optuna.samplers
    multi = len(params.objectives) > 1
    name = params.sampler or ("nsga2" if multi else "tpe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tpe":
            return samplers.TPESampler(
                seed=seed, n_startup_trials=params.startup_trials, multivariate=True,
                constant_liar=True,
            )
        if name == "random":
            return samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            return samplers.CmaEsSampler(
                seed=seed, n_startup_trials=params.startup_trials,
                independent_sampler=samplers.RandomSampler(seed=seed),
            )
        if name == "grid":
            space = {path: [encode(v) for v in dist.grid() or []] for path, dist in params.space.items()}
            return samplers.GridSampler(space, seed=seed)
        return samplers.NSGAIISampler(seed=seed)


def make_pruner(params: TuneParams) -> Any:
    pruners = optuna.pruners
    multi = len(params.objectives) > 1
    name = params.pruner or ("none" if multi else "median")
    if name == "median":
        return pruners.MedianPruner(
            n_startup_trials=params.startup_trials, n_warmup_steps=params.warmup_epochs
        )
    if name == "hyperband":
        return pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if name == "successive_halving":
        return pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return pruners.NopPruner()


def grid_size(params: TuneParams) -> int:
    return math.prod(len(d.grid() or []) for d in params.space.values())


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


def suggest(trial: optuna.Trial, params: TuneParams) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path, dist in params.space.items():
        if dist.type == "float":
            values[path] = trial.suggest_float(path, dist.low, dist.high, log=dist.log, step=dist.step)
        elif dist.type == "int":
            values[path] = trial.suggest_int(path, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[path] = decode(trial.suggest_categorical(path, [encode(c) for c in dist.choices]))
    return values


def derive_spec(spec: ResolvedSpec, registry: Any, values: dict[str, Any], trial: bool) -> ResolvedSpec:
    """The spec with ``values`` written at their dotted paths, validated again."""
    raw = copy.deepcopy(spec.raw)
    for dotted, value in values.items():
        set_path(raw, resolve_path(raw, dotted), value)
    if trial:
        # One line per trial instead of Keras's per-epoch lines, and no saved model
        # per trial: the study's result is a configuration (refit: true trains it).
        for stage in spec.stages:
            entry = registry.lookup_stage(stage.kind, stage.use)
            fields = entry.params.model_fields if entry is not None else {}
            for key, value in (("verbose", 0), ("save_model", False)):
                if key in fields:
                    raw["stages"][stage.index].setdefault("params", {})[key] = value
    return validate(YamlDocument(raw, {}, spec.source), registry, spec.overrides)


# --------------------------------------------------------------------------------------
# Counting trials, under a lock, so that workers share the budget exactly
# --------------------------------------------------------------------------------------


@dataclass
class Tally:
    counted: int = 0
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: set[int] = field(default_factory=set)


def tally(trials: list[Any]) -> Tally:
    """Count the study's trials. A failed trial that was retried (its worker died) or
    that Ctrl+C interrupted does not use up the budget; its retry does."""
    t = Tally()
    for trial in trials:
        t.retried.update(trial.system_attrs.get("retry_history", []))
    for trial in trials:
        if trial.state == TrialState.FAIL and (
            trial.number in t.retried or trial.user_attrs.get("dlpipe.interrupted")
        ):
            continue
        t.counted += 1
        if trial.state == TrialState.WAITING:
            t.waiting += 1
        elif trial.state == TrialState.RUNNING:
            t.running += 1
        elif trial.state == TrialState.COMPLETE:
            t.complete += 1
        elif trial.state == TrialState.PRUNED:
            t.pruned += 1
        elif trial.state == TrialState.FAIL:
            t.failed += 1
    return t


class StudyLock:
    """An exclusive file lock beside a SQLite study, held from "is a trial still
    needed?" until that trial exists. Server databases are shared across machines; for
    them this lock is local only, and concurrent starts may overshoot by a trial."""

    def __init__(self, url: str) -> None:
        self._handle: Any = None
        self.path: Path | None = None
        if url.startswith("sqlite:///"):
            self.path = Path(url[len("sqlite:///"):] + ".lock")

    def acquire(self) -> None:
        if self.path is None or self._handle is not None:
            return
        import fcntl

        self._handle = open(self.path, "w")  # noqa: SIM115 - held across calls
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


class Study:
    """One process's part in a study: runs trials until the budget is used."""

    def __init__(self, ctx: Any, params: TuneParams) -> None:
        self.ctx = ctx
        self.params = params
        self.spec: ResolvedSpec = ctx.spec
        self.stage: ResolvedStage = ctx.stage
        self.worker = int(os.environ.get(WORKER_ENV, "0") or 0)
        self.url = storage_url(params)
        self.name = study_name(self.spec, self.stage)
        self.lock = StudyLock(self.url)
        self.storage = make_storage(self.url, params)
        self.multi = len(params.objectives) > 1
        directions = [o.direction for o in params.objectives]
        with self.locked():  # two processes must not create the study at once
            existing = optuna.study.get_all_study_names(self.storage)
            self.study = optuna.create_study(
                study_name=self.name, storage=self.storage, load_if_exists=True,
                directions=directions,
                sampler=optuna.samplers.RandomSampler(),  # replaced below
                pruner=make_pruner(params),
            )
            self.resumed = self.name in existing
            name_metrics(self.study, [o.metric for o in params.objectives])
            trials = self.study.get_trials(deepcopy=False)
            self.target, self.joined = self._round(tally(trials))
        seed = params.seed if params.seed is not None else self.spec.settings.seed
        # Distinct seeds per worker and per session: no two draw the same random trials.
        self.study.sampler = make_sampler(params, seed + 1009 * self.worker + len(trials))
        self.prefix = self._data_prefix()
        self.trial_dir = paths.home() / "studies" / self.name
        self.started = time.monotonic()
        self.mine = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock.acquire()
        try:
            yield
        finally:
            self.lock.release()

    def _round(self, t: Tally) -> tuple[int, bool]:
        """How many trials the study should hold when this process stops.

        A run adds ``n_trials`` to the study, unless it finds a round still under
        way (trials running or missing, from other processes or an interrupted run):
        then it joins that round, so processes started together share one budget.
        Workers started by ``--workers`` are told their round.
        """
        given = os.environ.get(TARGET_ENV) if self.worker else None
        if given:
            return int(given), True
        target = self.study.user_attrs.get("dlpipe.target")
        if target is not None and (t.counted < target or t.running or t.waiting):
            return int(target), True
        target = t.counted + self.params.n_trials
        if self.params.sampler == "grid":
            target = min(target, grid_size(self.params))
        self.study.set_user_attr("dlpipe.target", target)
        return target, False

    def _data_prefix(self) -> list[ResolvedStage]:
        """The leading data stages that no search path reaches: run once, not per trial."""
        touched = set()
        for dotted in self.params.space:
            path = resolve_path(self.spec.raw, dotted)
            if path[0] == "stages":
                touched.add(int(path[1]))
            else:
                touched.add(-1)  # the seed: everything depends on it
        prefix = []
        for stage in self.spec.stages[: self.stage.index]:
            if stage.kind not in DATA_KINDS or stage.index in touched or -1 in touched:
                break
            prefix.append(stage)
        return prefix

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        tag = f" [worker {self.worker}]" if self.worker else ""
        t = tally(self.study.get_trials(deepcopy=False))
        what = "new study" if not self.resumed else "study"
        plan = (f"joining its round: {t.counted}/{self.target} trials" if self.joined
                else f"adding {self.target - t.counted} trials to {t.counted}")
        print(f"tune{tag}: {what} {self.name!r} in {_hide_password(self.url)}; {plan}", flush=True)
        if not self.worker:
            print(f"tune: watch it live with {dashboard_hint(self.url)}", flush=True)
        for stage in self.prefix:
            run_stage(self.ctx, stage)
        self.ctx.stage = self.stage
        self.base_data = self.ctx.data
        deadline = self.started + self.params.timeout if self.params.timeout else None
        interval = self.params.heartbeat_interval
        while True:
            self.lock.acquire()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optuna.storages.fail_stale_trials(self.study)
                t = tally(self.study.get_trials(deepcopy=False))
                expired = deadline is not None and time.monotonic() >= deadline
                start = not expired and (t.waiting > 0 or t.counted < self.target)
                if start:
                    # The lock is released by the objective, once its trial exists.
                    self.study.optimize(
                        self.objective, n_trials=1, catch=(Exception,), callbacks=[self.progress]
                    )
                    continue
            finally:
                self.lock.release()
            if t.running and not expired:
                time.sleep(min(interval, 5))  # another worker's trial may still need a retry
                continue
            break

    def objective(self, trial: optuna.Trial) -> Any:
        self.lock.release()
        self.mine += 1
        values = suggest(trial, self.params)
        trial.set_user_attr("dlpipe.worker", self.worker)
        trial.set_user_attr("dlpipe.pid", os.getpid())
        link = TrialRun(trial, self.params, self._prune_metric())
        self.current = (link, values, time.monotonic())
        try:
            spec = derive_spec(self.spec, self.ctx.plugins.registry, values, trial=True)
            stages = [s for s in spec.stages[: self.stage.index] if s.index >= len(self.prefix)]
            reset_backend(spec.settings.seed)
            run_nested(
                self.ctx, spec, stages, self.trial_dir / f"trial-{trial.number:04d}",
                data=self.base_data,
                run_name=f"{self.spec.name} trial {trial.number}",
                tags={"optuna.study": self.name, "optuna.trial": str(trial.number),
                      **{f"tune.{k}": _short(v) for k, v in values.items()}},
                extras={TRIAL_KEY: link},
            )
        except RunStopped as exc:
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("dlpipe.interrupted", True)
            raise
        except Exception as exc:
            link.error = link.error or f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("dlpipe.error", link.error[:2000])
            raise
        if link.error:
            trial.set_user_attr("dlpipe.error", link.error[:2000])
            raise DlpipeError(link.error)
        assert link.values is not None
        return link.values if self.multi else link.values[0]

    def _prune_metric(self) -> str | None:
        if self.multi:
            return None
        return self.params.prune_on or self.params.objectives[0].metric

    def progress(self, study: optuna.Study, frozen: Any) -> None:
        link, values, t0 = self.current
        t = tally(study.get_trials(deepcopy=False))
        tag = f" [worker {self.worker}]" if self.worker else ""
        state = frozen.state.name
        if frozen.state == TrialState.COMPLETE:
            shown = ", ".join(f"{o.metric}={v:.5g}" for o, v in zip(self.params.objectives, frozen.values, strict=False))
        elif frozen.state == TrialState.PRUNED:
            shown = f"at epoch {(link.pruned_at or 0) + 1}"
        else:
            shown = (frozen.user_attrs.get("dlpipe.error") or "")[:160]
        sampled = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())
        best = ""
        if not self.multi and t.complete:
            try:
                b = study.best_trial
                best = f", best {b.value:.5g} (trial {b.number})"
            except ValueError:
                pass
        elif self.multi and t.complete:
            best = f", Pareto front {len(study.best_trials)}"
        finished = t.complete + t.pruned + t.failed
        print(
            f"tune{tag}: trial {frozen.number} {state} {shown} [{sampled}] "
            f"{time.monotonic() - t0:.1f}s | {finished}/{self.target} done "
            f"({t.pruned} pruned, {t.failed} failed){best}",
            flush=True,
        )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def reset_backend(seed: int) -> None:
    """Free the previous trial's graphs and start the next from the same seed."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)


def optuna_tune(ctx: Any, params: TuneParams) -> None:
    """The ``tune/optuna`` stage."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if ctx.smoke:  # two in-process trials in a study of their own
        name = f"{params.study_name or study_name(ctx.spec, ctx.stage)}-smoke"
        params = params.model_copy(
            update={"n_trials": min(params.n_trials, 2), "workers": 1, "timeout": None,
                    "study_name": name})
    study = Study(ctx, params)
    workers = start_workers(ctx, params, study.target) if params.workers > 1 and not study.worker else []
    try:
        study.run()
    except BaseException:
        for proc in workers:
            proc.terminate()
        raise
    finally:
        for proc in workers:
            code = proc.wait()
            if code != 0:
                print(f"tune: worker process {proc.pid} exited with code {code}", flush=True)
    if study.worker:
        ctx.finished = True  # a worker only runs trials; the main process sums up
        return
    summarize(ctx, study)
    if params.refit:
        refit(ctx, study)


def start_workers(ctx: Any, params: TuneParams, target: int) -> list[subprocess.Popen[bytes]]:
    """Start ``workers - 1`` more processes on the same spec; they join the study."""
    spec: ResolvedSpec = ctx.spec
    cmd = [sys.executable, "-m", "dlpipe", "run", spec.source]
    for text in spec.overrides:
        cmd += ["--set", text]
    cmd += ["--set", f"{ctx.stage.id}.workers=1"]
    for folder in ctx.plugins.plugin_dirs:
        cmd += ["--plugins-dir", folder]
    tracker = ctx.extras.get("mlflow")
    if tracker is not None:
        cmd += ["--set", f"tracking.attach_run_id={tracker.wait_for_run_id()}"]
    elif not spec.settings.tracking.enabled:
        cmd += ["--no-track"]
    procs = []
    for i in range(1, params.workers):
        env = {**os.environ, WORKER_ENV: str(i), TARGET_ENV: str(target), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(cmd, env=env))
    print(f"tune: started {len(procs)} worker process(es)", flush=True)
    return procs


# --------------------------------------------------------------------------------------
# After the trials: the study's summary, plots and the refit
# --------------------------------------------------------------------------------------


def summarize(ctx: Any, study: Study) -> None:
    s = study.study
    trials = s.get_trials(deepcopy=False)
    t = tally(trials)
    counts = {"trials_complete": t.complete, "trials_pruned": t.pruned, "trials_failed": t.failed}
    ctx.tags["optuna.study"] = study.name
    ctx.tags["optuna.storage"] = _hide_password(study.url)
    out = ctx.run_dir / "tune"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"study": study.name, "storage": _hide_password(study.url), **counts}
    if t.complete == 0:
        print(f"tune: no trial completed ({t.pruned} pruned, {t.failed} failed)", flush=True)
        ctx.log_metrics(counts)
    elif study.multi:
        front = s.best_trials
        summary["pareto_front"] = [
            {"number": b.number, "values": b.values, "params": _decoded(b.params)} for b in front
        ]
        ctx.log_metrics({**counts, "pareto_front_size": len(front)})
        print(f"tune: Pareto front of {len(front)} trial(s):", flush=True)
        for b in front:
            vals = ", ".join(f"{o.metric}={v:.5g}" for o, v in zip(study.params.objectives, b.values, strict=False))
            print(f"  trial {b.number}: {vals}  {_decoded(b.params)}", flush=True)
    else:
        best = s.best_trial
        metric = study.params.objectives[0].metric
        summary |= {"best_trial": best.number, "best_value": best.value,
                    "best_params": _decoded(best.params)}
        # MLflow keeps the params a run started with (the spec's untuned values): the
        # best values go beside them, as metrics where they are numbers and as tags.
        numeric = {f"best.{path}": float(value) for path, value in best.params.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        ctx.log_metrics({**counts, "best_value": float(best.value), f"best_{metric}": float(best.value),
                         "best_trial": best.number, **numeric})
        for path, value in _decoded(best.params).items():
            ctx.tags[f"best.{path}"] = _short(value)
        run_id = best.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            ctx.tags["optuna.best_run_id"] = run_id
        print(f"tune: best {metric}={best.value:.5g} (trial {best.number}): "
              f"{_decoded(best.params)}", flush=True)
    summary_path = out / "study.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    ctx.log_artifact(summary_path, "tune")
    trials_path = out / "trials.csv"
    write_trials_csv(trials, trials_path)
    ctx.log_artifact(trials_path, "tune")
    for filename, figure in study_plots(s, study.params):
        ctx.log_figure(figure, filename, "tune")
    print(f"tune: study {study.name!r}; browse it with {dashboard_hint(study.url)}", flush=True)


def _decoded(params: dict[str, Any]) -> dict[str, Any]:
    return {k: decode(v) for k, v in params.items()}


def _hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


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
    """Retrain the best configuration on train+val in the study's own run."""
    s = study.study
    if not any(t.state == TrialState.COMPLETE for t in s.get_trials(deepcopy=False)):
        print("tune: nothing to refit, no trial completed", flush=True)
        return
    if study.multi:
        best = min(s.best_trials, key=lambda b: b.values[0] * (1 if study.params.objectives[0].direction == "minimize" else -1))
        print(f"tune: refitting Pareto trial {best.number} (best {study.params.objectives[0].metric})", flush=True)
    else:
        best = s.best_trial
    values = _decoded(best.params)
    spec = derive_spec(study.spec, ctx.plugins.registry, values, trial=False)
    print(f"tune: refitting trial {best.number}'s configuration on train+val: {values}", flush=True)
    ctx.tags["dlpipe.refit_trial"] = str(best.number)
    if study.base_data is not None:
        ctx.data = merged_train_val(study.base_data)
    reset_backend(spec.settings.seed)
    for stage in spec.stages[len(study.prefix) : study.stage.index]:
        run_stage(ctx, stage)
        if stage.kind in DATA_KINDS:
            ctx.data = merged_train_val(ctx.data)
