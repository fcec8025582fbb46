"""Setting up a study (storage, name, sampler, pruner) and one process's part in it:
the loop that takes trials and the objective that runs each as a nested run."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlpipe import paths
from dlpipe.engine import run_nested, run_stage
from dlpipe.errors import DlpipeError, RunStopped
from dlpipe.spec import ResolvedSpec, ResolvedStage, YamlDocument, resolve_path, set_path, validate
from dlpipe.stages.tune import TRIAL_KEY, TuneParams
from dlpipe.stages.tune.lock import StudyLock, Tally, tally
from dlpipe.stages.tune.report import dashboard_hint, hide_password, short
from dlpipe.stages.tune.trial import TrialRun, encode, suggest
from dlpipe.stages.tune.workers import TARGET_ENV, worker_number

#: Where the study is stored when neither the spec nor this variable says.
STORAGE_ENV = "DLPIPE_OPTUNA_STORAGE"


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


#: Connections each process keeps open to a server database (PostgreSQL, MySQL): the
#: trial loop and the heartbeat thread use one each, the rest is headroom. Optuna's
#: default (SQLAlchemy's 5 + 10) would let 10 workers hold 150 connections; the study
#: lock (:mod:`~dlpipe.stages.tune.lock`) holds one more of its own.
POOL_SIZE = 2
POOL_OVERFLOW = 2


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy settings for the study's storage: a long busy timeout for SQLite; a
    small pool for a server database, checked before use (a server restart or an idle
    timeout must not fail a trial) and renewed every half hour."""
    if url.startswith("sqlite:"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, "pool_pre_ping": True,
            "pool_recycle": 1800}


def make_storage(url: str, params: TuneParams) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental
        kwargs: dict[str, Any] = {
            "heartbeat_interval": params.heartbeat_interval,
            "grace_period": params.grace_period or 3 * params.heartbeat_interval,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=params.max_retries),
        }
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
            except ImportError as exc:
                raise DlpipeError(
                    f"cannot open the Optuna storage {hide_password(url)!r}: {exc.__cause__ or exc}\n"
                    "    for PostgreSQL: pip install 'dlpipe[postgres]'"
                ) from None
            except Exception as exc:
                # Processes that open a new database at once may race to create its
                # tables; the loser finds them on the next try.
                text = str(exc).lower()
                if attempt < 2 and ("already exists" in text or "duplicate key" in text):
                    time.sleep(0.5 + attempt)
                    continue
                raise DlpipeError(
                    f"cannot open the Optuna storage {hide_password(url)!r}: "
                    f"{type(exc).__name__}: {exc}\n"
                    f"    set tune params.storage or ${STORAGE_ENV} to a reachable database URL"
                ) from None
    raise AssertionError("unreachable")


def name_metrics(study: optuna.Study, names: list[str]) -> None:
    """Name the objectives in the study, so that Optuna's dashboard shows
    ``val_accuracy`` instead of ``Objective 0``."""
    if study.metric_names == names:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is marked experimental
        study.set_metric_names(names)



def make_sampler(params: TuneParams, seed: int) -> Any:
    """The study's sampler: a new one of the configured kind for each trial, seeded from
    ``seed`` and the trial's number (see :class:`TrialSeeded`). The grid sampler is
    the exception: its seed shuffles the grid, which every process must share, and it
    gives trial ``n`` grid point ``n``, so processes already take distinct points."""
    if params.sampler == "grid":
        return sampler_of(params, seed)
    return TrialSeeded(lambda s: sampler_of(params, s), seed)


def sampler_of(params: TuneParams, seed: int) -> Any:
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


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` in a study seeded with ``seed``."""
    digest = hashlib.sha256(f"dlpipe.tune:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class TrialSeeded(optuna.samplers.BaseSampler):
    """A fresh sampler for each trial, seeded from the study's seed and the trial's
    number.

    The storage hands out each trial number once, so every trial draws from a stream
    of its own, whichever process runs it and however many processes started with the
    same seed; one process on a new study draws the same trials from the same seed.
    TPE, random, CMA-ES and NSGA-II keep their state in the storage (the trials,
    CMA-ES's system attrs), not in the object, so a new one per trial samples as the old
    one would; only its random numbers differ.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self.make = make
        self.seed = seed
        self.inner = make(seed)

    def __str__(self) -> str:
        return f"{type(self.inner).__name__} (seeded per trial from {self.seed})"

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner = self.make(trial_seed(self.seed, trial.number))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: Any) -> Any:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


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


def prepares_data(registry: Any, stage: ResolvedStage) -> bool:
    """Whether ``stage`` provides the data later stages read, as its registration
    declares (a data source, a tokenizer), whatever its kind is called."""
    entry = registry.lookup_stage(stage.kind, stage.use)
    return entry is not None and entry.prepares_data


# --------------------------------------------------------------------------------------
# One process's part in the study
# --------------------------------------------------------------------------------------


class Study:
    """One process's part in a study: runs trials until the budget is used."""

    def __init__(self, ctx: Any, params: TuneParams) -> None:
        self.ctx = ctx
        self.params = params
        self.spec: ResolvedSpec = ctx.spec
        self.stage: ResolvedStage = ctx.stage
        self.worker = worker_number()
        self.url = storage_url(params)
        self.name = study_name(self.spec, self.stage)
        self.lock = StudyLock(self.url, self.name)
        self.multi = len(params.objectives) > 1
        directions = [o.direction for o in params.objectives]
        # Two processes must not create the tables or the study at once.
        with self.locked():
            self.storage = make_storage(self.url, params)
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
        # Each trial's sampler is seeded from this and the trial's number, which the
        # storage hands out once: processes never draw the same trials.
        self.seed = params.seed if params.seed is not None else self.spec.settings.seed
        self.study.sampler = make_sampler(params, self.seed)
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
        """The leading stages that prepare data (their registration says so) and that no
        search path reaches: run once, not per trial."""
        touched = set()
        for dotted in self.params.space:
            path = resolve_path(self.spec.raw, dotted)
            if path[0] == "stages":
                touched.add(int(path[1]))
            else:
                touched.add(-1)  # the seed: everything depends on it
        registry = self.ctx.plugins.registry
        prefix = []
        for stage in self.spec.stages[: self.stage.index]:
            if not prepares_data(registry, stage) or stage.index in touched or -1 in touched:
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
        print(f"tune{tag}: {what} {self.name!r} in {hide_password(self.url)}; {plan}", flush=True)
        if not self.worker:
            print(f"tune: watch it live with {dashboard_hint(self.url)}", flush=True)
            if self.lock.scope != "database":
                print("tune: this storage has no database lock: processes on other machines "
                      "may add a trial or two beyond the budget (use PostgreSQL)", flush=True)
        try:
            self._run()
        finally:
            self.lock.close()

    def _run(self) -> None:
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
                      **{f"tune.{k}": short(v) for k, v in values.items()}},
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
        sampled = ", ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in values.items())
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


def reset_backend(seed: int) -> None:
    """Free the previous trial's graphs and start the next from the same seed."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)

