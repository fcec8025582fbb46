"""The dlpipe plugin API.

This module is the whole contract between dlpipe and its plugins, and its reference
documentation. A plugin is any module or object with functions named after the hooks
below and decorated with :data:`hookimpl`::

    from dlpipe import hookimpl

    @hookimpl
    def register_models(register):
        register("tiny_mlp", build="my_pkg.tiny:build", params=TinyParams)

dlpipe's own stages, architectures, strategies and its MLflow tracking are plugins
written exactly this way: each architecture is a package under ``dlpipe/models/``
and each stage family one under ``dlpipe/stages/`` (see ``docs/architecture.md``).

How plugins are found, in this order (each loaded once):

1. the built-in modules that :func:`dlpipe.plugins.builtin_plugins` lists (the stage
   plugins, then every architecture package under ``dlpipe/models/``);
2. installed packages that declare an entry point in the ``dlpipe`` group;
3. ``*.py`` files in ``./plugins`` (or every ``--plugins-dir``);
4. the spec's ``plugins:`` list (module names or ``.py`` paths).

Every pipeline gets its own :class:`pluggy.PluginManager`; there is no global one.

Two families of hooks:

*Registration hooks* (``register_*``) are called once per plugin when the manager is
built, each with a ``register`` callback owned by dlpipe. The callback records which
plugin registered each name, checks what it is given, and refuses a name that another
plugin already took (the error names both plugins). Return values are ignored.

*Lifecycle hooks* (``before_*``, ``after_*``, ``on_*``) are called while a pipeline
runs, in every plugin that implements them; return values are ignored. An exception in
a lifecycle hook fails the run. They receive the live :class:`dlpipe.context.RunContext`.

Heavy imports (TensorFlow, Keras, MLflow) belong inside the functions a plugin
registers, never at the top of the plugin module: ``dlpipe validate`` and
``dlpipe plugins`` load every plugin and must stay fast. ``register`` accepts either a
callable or a ``"package.module:function"`` string that is imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from dlpipe.context import RunContext
    from dlpipe.params import Params
    from dlpipe.spec import StageSpec

PROJECT_NAME = "dlpipe"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorator that marks a function as a dlpipe hook implementation.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: A stage function: ``run(context, params)``. It reads and writes the context.
StageFunction = Callable[["RunContext", "Params"], None]
#: A model builder: ``build(params, data)`` returns a ``keras.Model``.
ModelBuilder = Callable[["Params", Any], Any]
#: A model's plot hook: ``plots(context, model, data)`` yields ``(filename, figure)``.
ModelPlots = Callable[["RunContext", Any, Any], Any]
#: A model's training callbacks: ``callbacks(context, model, data)`` returns a list of
#: ``keras.callbacks.Callback`` added to ``fit`` (sample grids every few epochs, ...).
ModelCallbacks = Callable[["RunContext", Any, Any], Any]
#: A strategy factory: ``create(params)`` returns a ``tf.distribute.Strategy``.
StrategyFactory = Callable[["Params"], Any]


class StageRegistrar(Protocol):
    """The ``register`` callback passed to :func:`register_stages`."""

    def __call__(
        self,
        kind: str,
        name: str,
        run: StageFunction | str,
        params: type[Params] | None = None,
        description: str = "",
        runs_previous: bool = False,
        needs: Sequence[str] | None = None,
        provides: Sequence[str] | None = None,
    ) -> None:
        """Register stage implementation ``name`` for stage ``kind``.

        :param kind: the stage kind it serves: ``data``, ``augment``, ``train``,
            ``evaluate``, ``tune``, or a new kind of the plugin's own.
        :param name: what a spec writes after ``use:``; unique within ``kind``.
        :param run: ``run(context, params)`` or a ``"module:function"`` string.
        :param params: a :class:`dlpipe.Params` subclass; ``None`` means no parameters.
        :param description: one line for ``dlpipe plugins`` and the JSON Schema.
        :param runs_previous: the stage drives the stages listed before it instead of
            the engine, as a tuner does (once per trial, each a nested run through
            :func:`dlpipe.engine.run_nested`). The engine then starts the pipeline with
            this stage; stages after it run normally. A spec may hold one such stage.
        :param needs: what the stages before it must have provided, as names such as
            ``"data"``, ``"model"`` or ``"trained_model"``. ``dlpipe validate`` checks
            every stage's needs against what the stages listed before it provide, so
            a spec that puts train before model fails before TensorFlow loads, with
            a message naming the stage, what it needs and what to add.
        :param provides: what it leaves in the run context for the stages after it.
            Names are free: a plugin may add its own (``"exported_model"``) for its
            own stages to need. What a stage provides stays available to every later
            stage; a ``runs_previous`` stage sees what the stages before it provide.

            ``None`` (the default) means the usual contract of the kind
            (:data:`dlpipe.plugins.STAGE_DEFAULTS`): ``data`` provides ``data``;
            ``augment`` needs ``data``; ``model`` (every architecture) needs ``data``
            and provides ``model``; ``train`` needs ``data`` and ``model`` and
            provides ``trained_model``; ``evaluate`` and ``tune`` need ``data`` and
            ``model``. A kind of the plugin's own needs and provides nothing unless
            it says; ``()`` says so explicitly for a built-in kind.
        """


class ModelRegistrar(Protocol):
    """The ``register`` callback passed to :func:`register_models`."""

    def __call__(
        self,
        name: str,
        build: ModelBuilder | str,
        params: type[Params] | None = None,
        description: str = "",
        task: str = "generic",
        loss_weights: Sequence[str] = (),
        plots: ModelPlots | str | None = None,
        example_params: Mapping[str, Any] | None = None,
        callbacks: ModelCallbacks | str | None = None,
        example_data: Callable[[], Any] | str | None = None,
        xla: bool = True,
    ) -> None:
        """Register architecture ``name``, used by a spec as ``kind: model, use: NAME``.

        :param build: ``build(params, data)`` returning an uncompiled ``keras.Model``;
            ``data`` is the :class:`dlpipe.data.DataBundle` of the data stage. It is
            called inside the distribution strategy's scope. A builder that declares a
            third parameter (``build(params, data, context)``) also gets the
            :class:`~dlpipe.context.RunContext`, e.g. to use a model an earlier stage
            trained (``context.models[stage_id]``); the conformance test passes
            ``None`` there.
        :param task: ``classification``, ``regression``, ``generative``, ... The
            evaluate stage uses it to pick generic plots (a confusion matrix for
            ``classification``) and the default loss.
        :param loss_weights: names of the model's own loss terms. A train stage's
            ``loss_weights`` may only name these; the model reads the weights from
            its ``loss_weights`` mapping.
        :param plots: ``plots(context, model, data)`` yielding ``(filename, figure)``
            pairs, logged as artifacts by the evaluate stage.
        :param example_params: small settings the conformance test builds the model
            with; defaults to the params' defaults.
        :param callbacks: ``callbacks(context, model, data)`` returning Keras callbacks
            the train stage adds to ``fit``, for example one that logs a sample grid
            every few epochs with ``context.log_figure``. Called once per training run.
        :param example_data: ``example_data()`` returning a small
            :class:`dlpipe.data.DataBundle` the conformance test trains on, for models
            that cannot use the default random 8x8 images (sequence models need token
            ids and vocabularies).
        :param xla: whether the model's steps compile with XLA
            (``model.compile(jit_compile=True)`` compiles ``train_step``, ``test_step``
            and ``predict_step``). ``False`` marks a model with an op XLA cannot
            compile in one of them (an op without an XLA kernel, a data-dependent shape):
            the train stage's ``jit_compile: auto`` then trains it without XLA, where
            Keras would otherwise turn XLA on (on a GPU), and ``jit_compile: true``
            fails with an error naming the architecture. ``dlpipe plugins`` shows it.
            ``benchmarks/probe/xla_probe.py`` tells which value is right.
        """


class StrategyRegistrar(Protocol):
    """The ``register`` callback passed to :func:`register_strategies`."""

    def __call__(
        self,
        name: str,
        create: StrategyFactory | str,
        params: type[Params] | None = None,
        description: str = "",
    ) -> None:
        """Register a distribution strategy a spec selects with ``strategy: NAME``.

        :param create: ``create(params)`` returning a ``tf.distribute.Strategy``. It is
            called once per run, before any stage, so it may still configure devices.
        """


# --------------------------------------------------------------------------------------
# Registration hooks
# --------------------------------------------------------------------------------------


@hookspec
def register_stages(register: StageRegistrar) -> None:
    """Register stage implementations by calling ``register(kind, name, run, ...)``.

    Called once per plugin when a plugin manager is built. Return value ignored.
    """


@hookspec
def register_models(register: ModelRegistrar) -> None:
    """Register architectures by calling ``register(name, build, ...)``.

    Called once per plugin when a plugin manager is built. Return value ignored.
    """


@hookspec
def register_strategies(register: StrategyRegistrar) -> None:
    """Register distribution strategies by calling ``register(name, create, ...)``.

    Called once per plugin when a plugin manager is built. Return value ignored.
    """


# --------------------------------------------------------------------------------------
# Lifecycle hooks
# --------------------------------------------------------------------------------------


@hookspec
def before_run(context: RunContext) -> None:
    """Called once when a run starts: the spec has validated, but TensorFlow is not
    imported yet and ``context.strategy`` is still ``None`` (it is created next).
    ``context.spec`` is the resolved spec.

    If it raises, the run does not start and ``on_run_error`` is not called. The
    tracking plugin starts its MLflow run here, so set-up overlaps TensorFlow's import.
    """


@hookspec
def after_run(context: RunContext) -> None:
    """Called once after the last stage finished without error."""


@hookspec
def on_run_error(context: RunContext, error: BaseException) -> None:
    """Called once when the run fails, after :func:`on_stage_error`.

    ``error`` may be a ``KeyboardInterrupt``. Implementations must not raise; the
    original error is re-raised after every implementation ran.
    """


@hookspec
def before_stage(context: RunContext, stage: StageSpec) -> None:
    """Called before each stage runs; ``context.stage`` is ``stage``."""


@hookspec
def after_stage(context: RunContext, stage: StageSpec) -> None:
    """Called after each stage finished without error."""


@hookspec
def on_stage_error(context: RunContext, stage: StageSpec, error: BaseException) -> None:
    """Called when ``stage`` raised; the run then fails (see :func:`on_run_error`)."""


@hookspec
def on_metrics(
    context: RunContext, stage: StageSpec, metrics: Mapping[str, float], step: int | None
) -> None:
    """Called when a stage reports metrics: once per epoch from training (``step`` is
    the 0-based epoch) and once with final values from evaluation (``step`` is None).

    Called at most once per epoch, never per batch, so it may do I/O.
    """


@hookspec
def on_artifact(context: RunContext, stage: StageSpec, path: str, artifact_path: str) -> None:
    """Called when a stage produced a file (a plot, the saved model, the resolved spec).

    ``path`` is the local file; ``artifact_path`` the folder it belongs in, such as
    ``plots`` or ``model``.
    """
