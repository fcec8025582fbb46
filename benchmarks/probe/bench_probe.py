"""A measuring-only dlpipe plugin that ``bench_vae.py`` drops into a run's ``plugins/``.

It changes nothing the run computes. It records wall-clock timestamps (``time.time()``,
comparable with the parent's launch time) of the lifecycle hooks, the wall time of
``model.fit`` itself (``time.perf_counter`` around the call, like the plain script),
the moment each epoch's metrics are reported (wall and process CPU time), and the seconds spent in each epoch
hook of the train stage's callbacks (by class). It writes them as JSON to
``$DLPIPE_BENCH_PROBE`` (default ``dlpipe_probe.json`` in the working directory) at
the very end of the run. Its hooks run first at each start and last at each end, so
the other plugins' work (MLflow set-up, flushing) falls inside the measured spans.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from dlpipe import hookimpl

__version__ = "0.1.0"

_events: list[tuple[str, float]] = [("plugin_loaded", time.time())]
_epochs: list[float] = []  # time.perf_counter() when each epoch's metrics arrive
_epochs_cpu: list[float] = []  # time.process_time() at the same moments
_fit: dict[str, float] = {}
_epoch_time_s: list[float] = []  # the epoch_time_s dlpipe reports (with or without MLflow)
#: callback class -> hook -> seconds spent in it, one entry per call
_callbacks: dict[str, dict[str, list[float]]] = {}
_CALLBACK_HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end")


def _time_callback(callback: Any) -> None:
    """Time each epoch-level hook of one of the train stage's callbacks."""
    record = _callbacks.setdefault(type(callback).__name__, {})
    for hook in _CALLBACK_HOOKS:
        method = getattr(callback, hook)
        calls = record.setdefault(hook, [])

        def timed(*args: Any, _method: Any = method, _calls: list = calls, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                _calls.append(time.perf_counter() - t0)

        object.__setattr__(callback, hook, timed)


def _mark(name: str) -> None:
    _events.append((name, time.time()))


@hookimpl(tryfirst=True)
def before_run(context: Any) -> None:
    _mark("before_run")


@hookimpl(trylast=True)
def before_stage(context: Any, stage: Any) -> None:
    # Last, so that the time of the other plugins' before_stage hooks is not in the stage.
    _mark(f"stage_start:{stage.kind}")
    if stage.kind == "train" and context.model is not None:
        model = context.model
        fit = model.fit

        def timed_fit(*args: Any, **kwargs: Any) -> Any:
            for callback in kwargs.get("callbacks") or []:
                _time_callback(callback)
            _events.append(("fit_start", time.time()))
            _fit["fit_cpu0"] = time.process_time()
            t0 = time.perf_counter()
            try:
                return fit(*args, **kwargs)
            finally:
                _fit["fit_s"] = time.perf_counter() - t0
                _fit["fit_t0"] = t0
                _events.append(("fit_end", time.time()))

        # An instance attribute shadows the method for this one run; object.__setattr__
        # keeps Keras' attribute tracking out of it.
        object.__setattr__(model, "fit", timed_fit)


@hookimpl(tryfirst=True)
def after_stage(context: Any, stage: Any) -> None:
    _mark(f"stage_end:{stage.kind}")
    if stage.kind == "train" and "fit" in vars(context.model):
        object.__delattr__(context.model, "fit")


@hookimpl
def on_metrics(context: Any, stage: Any, metrics: Any, step: Any) -> None:
    if step is not None and stage is not None and stage.kind == "train":
        _epochs.append(time.perf_counter())
        _epochs_cpu.append(time.process_time())
        if "epoch_time_s" in metrics:
            _epoch_time_s.append(float(metrics["epoch_time_s"]))


@hookimpl(tryfirst=True)
def after_run(context: Any) -> None:
    _mark("after_run_start")


@hookimpl(trylast=True, specname="after_run")
def after_run_last(context: Any) -> None:
    """After the tracking plugin flushed and closed its run: write the record."""
    _mark("after_run_end")
    t0 = _fit.get("fit_t0")
    # Seconds from one epoch's metrics to the next: the whole epoch, every callback
    # included (the first one is measured from the start of fit).
    periods = []
    if t0 is not None and _epochs:
        marks = [t0, *_epochs]
        periods = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    cpu_periods = []
    if "fit_cpu0" in _fit and _epochs_cpu:
        marks = [_fit["fit_cpu0"], *_epochs_cpu]
        cpu_periods = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    out = {
        "events": _events,
        "fit_s": _fit.get("fit_s"),
        "epoch_period_s": periods,
        "epoch_cpu_s": cpu_periods,
        "epoch_time_s": _epoch_time_s,
        "callbacks": _callbacks,
        "run_id": getattr(context, "run_id", None),
    }
    path = os.environ.get("DLPIPE_BENCH_PROBE", "dlpipe_probe.json")
    with open(path, "w") as f:
        json.dump(out, f)
