"""Running a validated pipeline: strategy, stages in order, lifecycle hooks."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlpipe import paths, startup
from dlpipe.context import RunContext
from dlpipe.errors import DlpipeError
from dlpipe.plugins import PluginHost
from dlpipe.spec import ResolvedSpec, ResolvedStage

log = logging.getLogger("dlpipe")


def run_dir_for(spec: ResolvedSpec) -> Path:
    """The run's folder: stable for a given spec, so a killed run resumes from it."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-") or "pipeline"
    return paths.home() / "runs" / f"{slug}-{spec.digest()}"


def configure_backend(seed: int, precision: str = "float32") -> None:
    """Load TensorFlow quietly, seed every generator, set the dtype policy.

    The first time in a process, TensorFlow's start-up lines (:func:`startup_noise`)
    are filtered out of stderr while it loads and looks for GPUs; any other line passes.
    ``DLPIPE_DEBUG=1`` shows them all (see :mod:`dlpipe.startup`). Every ``dlpipe run`` process comes through here
    first, tune workers included.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    quiet = "tensorflow" not in sys.modules and os.environ.get(startup.DEBUG_ENV) != "1"
    with startup.filtered_stderr(startup.startup_noise()) if quiet else contextlib.nullcontext():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # Without a GPU, CUDA's failure to start is reported here, not mid-run.
            tf.config.list_physical_devices()

    keras.utils.set_random_seed(seed)
    # Global in Keras; set on every run so one mixed-precision run does not leak into
    # the next one in the same process (tests, tuning trials).
    keras.mixed_precision.set_global_policy(precision)


def create_strategy(spec: ResolvedSpec, plugins: PluginHost) -> Any:
    entry = plugins.registry.strategies[spec.strategy_name]
    return entry.factory()(spec.strategy_params)


def run_stage(ctx: RunContext, stage: ResolvedStage) -> None:
    """Run one stage between its before/after hooks."""
    entry = ctx.plugins.registry.lookup_stage(stage.kind, stage.use)
    assert entry is not None, "validated specs only name registered stages"
    ctx.stage = stage
    ctx.hook.before_stage(context=ctx, stage=stage)
    try:
        entry.function()(ctx, stage.params)
    except BaseException as exc:
        ctx.hook.on_stage_error(context=ctx, stage=stage, error=exc)
        raise
    ctx.hook.after_stage(context=ctx, stage=stage)


def driver_index(spec: ResolvedSpec, plugins: PluginHost) -> int | None:
    """Index of the stage registered with ``runs_previous`` (the tune stage), if any."""
    for i, stage in enumerate(spec.stages):
        entry = plugins.registry.lookup_stage(stage.kind, stage.use)
        if entry is not None and entry.runs_previous:
            return i
    return None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process: two runs of the same spec at once would
    write the same checkpoints. The lock file holds the owner's pid; the kernel drops
    the lock when the process dies, so a killed run never leaves a stale lock."""
    import fcntl

    path = run_dir / ".lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise DlpipeError(
                f"another run of this spec (pid {owner}) is using its run folder {run_dir}.\n"
                f"    Wait for it to finish, or stop it (kill {owner}) and re-run this "
                "command to resume it. To run a second copy side by side, give it another "
                "name: --set name=<other name>."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def run_pipeline(
    spec: ResolvedSpec,
    plugins: PluginHost,
    run_dir: Path | None = None,
    *,
    smoke: bool = False,
    restart: bool = False,
    resume_older: bool = False,
) -> RunContext:
    """Run every stage of ``spec``. Lifecycle hooks see the start, each stage, the end
    and any error; the error is re-raised after ``on_run_error``.

    When a stage was registered with ``runs_previous`` (a tuner), the stages before it
    are its business: the engine starts with that stage.

    ``smoke=True`` is a quick end-to-end check (:attr:`RunContext.smoke`): it gets its
    own run folder, so it neither resumes nor disturbs the real run, and is tracked as
    ``<name>-smoke`` with the tag ``dlpipe.smoke=true``.

    A run that was killed or failed resumes when run again: train stages continue
    from their last snapshot (``restart=True`` starts over; ``resume_older=True``
    skips a damaged newest snapshot). The resume state is removed once the run has
    finished. The run folder is locked while the run lasts, unless a tune stage drives
    the run (tuning processes share a study on purpose).
    """
    if run_dir is None:
        run_dir = run_dir_for(spec)
        if smoke:
            run_dir = run_dir.with_name(run_dir.name + "-smoke")
    # A worker of a multi-worker cluster that is not the chief works in a folder of its
    # own inside the chief's: the chief alone writes the run folder's files.
    chief_run_dir = None
    worker = worker_name(spec)
    if worker is not None:
        chief_run_dir, run_dir = run_dir, run_dir / "workers" / worker
    run_dir.mkdir(parents=True, exist_ok=True)
    # A tuner's processes share its study on purpose (--workers, or the same spec run
    # twice); its trials have folders of their own. Other specs hold the run folder.
    shared = driver_index(spec, plugins) is not None
    with contextlib.nullcontext() if shared else run_dir_lock(run_dir):
        ctx = _run_locked(spec, plugins, run_dir, smoke, restart, resume_older, chief_run_dir)
    if chief_run_dir is not None:  # its scratch folder; resuming reads the chief's
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()
        ctx.run_dir = chief_run_dir  # the run's outputs are the chief's
    return ctx


def worker_name(spec: ResolvedSpec) -> str | None:
    """``None`` unless this process is a worker, not the chief, of a multi-worker
    cluster; then its name (``worker-1``), as the strategy params tell it before
    TensorFlow loads (see :attr:`RunContext.is_chief`)."""
    ask = getattr(spec.strategy_params, "worker_name", None)
    return ask() if callable(ask) else None


def _run_locked(
    spec: ResolvedSpec, plugins: PluginHost, run_dir: Path, smoke: bool, restart: bool,
    resume_older: bool, chief_run_dir: Path | None = None,
) -> RunContext:
    ctx = RunContext(spec=spec, plugins=plugins, run_dir=run_dir, smoke=smoke,
                     restart=restart, resume_older=resume_older, chief_run_dir=chief_run_dir)
    if smoke:
        ctx.run_name = f"{spec.settings.tracking.run_name or spec.name}-smoke"
        ctx.tags["dlpipe.smoke"] = "true"
    first = driver_index(spec, plugins) or 0
    # before_run comes first, before TensorFlow is even imported: tracking starts its
    # work in parallel with the import, and a failing strategy is recorded like any error.
    ctx.hook.before_run(context=ctx)
    try:
        configure_backend(spec.settings.seed, spec.settings.precision)
        ctx.strategy = create_strategy(spec, plugins)
        for stage in spec.stages[first:]:
            run_stage(ctx, stage)
            if ctx.finished:
                break
    except BaseException as exc:
        lost = _worker_lost(ctx, exc)
        _safe_on_run_error(ctx, lost or exc)
        if lost is not None:
            raise lost from exc
        raise
    ctx.stage = None
    ctx.hook.after_run(context=ctx)
    discard_resume_state(ctx)
    return ctx


def _worker_lost(ctx: RunContext, exc: BaseException) -> DlpipeError | None:
    """A clear error for a collective op that failed because another worker of a
    multi-worker cluster died or hung; ``None`` for any other error."""
    if getattr(ctx.strategy, "cluster_resolver", None) is None:
        return None
    from dlpipe.strategies.multi_worker import explain_failure

    return explain_failure(ctx.strategy, exc)


def discard_resume_state(ctx: RunContext) -> None:
    """The run finished: its resume snapshots are no longer needed (a re-run of the
    spec is a new run)."""
    for folder in ctx.discard_on_success:
        shutil.rmtree(folder, ignore_errors=True)
    ctx.discard_on_success.clear()


def run_nested(
    parent: RunContext,
    spec: ResolvedSpec,
    stages: list[ResolvedStage],
    run_dir: Path,
    *,
    data: Any = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    extras: dict[str, Any] | None = None,
) -> RunContext:
    """Run ``stages`` as a run nested in ``parent`` (a tuning trial in its study).

    The nested run gets its own context (``context.parent`` is ``parent``), shares the
    parent's plugins and strategy, starts from ``data`` when a driver prepared it
    once for every trial, and goes through the same lifecycle hooks as a top-level
    run, so tracking records it as a child run. Errors are re-raised after
    ``on_run_error``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        spec=spec,
        plugins=parent.plugins,
        run_dir=run_dir,
        strategy=parent.strategy,
        data=data,
        parent=parent,
        smoke=parent.smoke,
        run_name=run_name,
        tags=dict(tags or {}),
        extras=dict(extras or {}),
    )
    ctx.hook.before_run(context=ctx)
    try:
        for stage in stages:
            run_stage(ctx, stage)
    except BaseException as exc:
        _safe_on_run_error(ctx, exc)
        raise
    ctx.stage = None
    ctx.hook.after_run(context=ctx)
    discard_resume_state(ctx)
    return ctx


def _safe_on_run_error(ctx: RunContext, exc: BaseException) -> None:
    # pluggy lists implementations in reverse call order (tryfirst ones last).
    for impl in reversed(ctx.hook.on_run_error.get_hookimpls()):
        try:
            impl.function(context=ctx, error=exc)
        except Exception:  # an error handler must not mask the original error
            log.exception("plugin %s failed in on_run_error", impl.plugin_name)
