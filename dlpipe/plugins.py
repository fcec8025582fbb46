"""Building a plugin manager and the registry of what plugins provide.

:func:`load_plugins` builds a fresh :class:`pluggy.PluginManager` for one pipeline,
loads every plugin source and collects what the registration hooks register into a
:class:`Registry`. Nothing here is global, so tests can build as many as they like.
"""

from __future__ import annotations

import importlib
import importlib.metadata as importlib_metadata
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from dlpipe import hookspecs
from dlpipe.errors import PluginError
from dlpipe.params import NoParams, Params

ENTRY_POINT_GROUP = "dlpipe"
#: Comma-separated plugin names that are not loaded (entry points, folder files).
BLOCK_ENV = "DLPIPE_BLOCK_PLUGINS"
#: When set to "1", entry-point plugins are not loaded at all.
DISABLE_ENTRY_POINTS_ENV = "DLPIPE_DISABLE_ENTRY_POINTS"

NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def resolve_ref(ref: Any, what: str) -> Any:
    """Turn a ``"module:attr"`` string into the object; return callables unchanged."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot import {what} {ref!r}: {exc}") from exc
    return obj


@dataclass
class PluginInfo:
    """One loaded plugin, as ``dlpipe plugins`` shows it."""

    name: str
    source: str  # builtin | entrypoint | plugins-dir | spec | in-process
    origin: str  # module name, file path or distribution
    version: str | None = None
    hooks: list[str] = field(default_factory=list)


#: What a stage of each kind needs from the stages before it and provides to those
#: after it, when its registration does not say (see :class:`hookspecs.StageRegistrar`).
#: A kind not listed here needs and provides nothing by default.
STAGE_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": ((), ("data",)),
    "augment": (("data",), ()),
    "model": (("data",), ("model",)),
    "train": (("data", "model"), ("trained_model",)),
    "evaluate": (("data", "model"), ()),
    "tune": (("data", "model"), ()),
}


@dataclass
class StageEntry:
    kind: str
    name: str
    run: Callable[..., Any] | str
    params: type[Params]
    description: str
    plugin: str
    runs_previous: bool = False
    #: What earlier stages must have provided; what this stage provides to later ones.
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def function(self) -> Callable[..., Any]:
        return resolve_ref(self.run, f"stage {self.kind}/{self.name}")

    # What the stage is for, read from its registration rather than its kind's name,
    # so a plugin's own kinds behave like the built-ins.
    @property
    def builds_model(self) -> bool:
        """It provides a model (the ``model`` stage; a plugin's own model-making kind)."""
        return "model" in self.provides and "model" not in self.needs

    @property
    def prepares_data(self) -> bool:
        """It provides the data later stages read (a data source, a tokenizer)."""
        return "data" in self.provides

    @property
    def drives_previous(self) -> bool:
        """It runs the stages before it itself (the tune stage): ``runs_previous``."""
        return self.runs_previous


@dataclass
class ModelEntry:
    name: str
    build: Callable[..., Any] | str
    params: type[Params]
    description: str
    plugin: str
    task: str = "generic"
    loss_weights: tuple[str, ...] = ()
    plots: Callable[..., Any] | str | None = None
    example_params: Mapping[str, Any] | None = None
    callbacks: Callable[..., Any] | str | None = None
    example_data: Callable[..., Any] | str | None = None
    #: Its steps compile with XLA (``jit_compile=True``); see ``register_models(xla=)``.
    xla: bool = True

    def builder(self) -> Callable[..., Any]:
        return resolve_ref(self.build, f"model {self.name}")

    def plotter(self) -> Callable[..., Any] | None:
        return None if self.plots is None else resolve_ref(self.plots, f"plots of {self.name}")

    def callback_factory(self) -> Callable[..., Any] | None:
        if self.callbacks is None:
            return None
        return resolve_ref(self.callbacks, f"callbacks of {self.name}")


@dataclass
class StrategyEntry:
    name: str
    create: Callable[..., Any] | str
    params: type[Params]
    description: str
    plugin: str

    def factory(self) -> Callable[..., Any]:
        return resolve_ref(self.create, f"strategy {self.name}")


#: The stage that builds models; a spec's ``kind: model, use: NAME`` names an architecture.
MODEL_STAGE_RUN = "dlpipe.stages.model:build_model"


class Registry:
    """Everything the registration hooks registered, keyed by name, with its plugin."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, StageEntry]] = {}
        self.models: dict[str, ModelEntry] = {}
        self.strategies: dict[str, StrategyEntry] = {}

    # -- registration callbacks (one bound per plugin) ---------------------------------
    def stage_registrar(self, plugin: str) -> hookspecs.StageRegistrar:
        def register(
            kind: str,
            name: str,
            run: Any,
            params: type[Params] | None = None,
            description: str = "",
            runs_previous: bool = False,
            needs: Sequence[str] | None = None,
            provides: Sequence[str] | None = None,
        ) -> None:
            _check_name(plugin, "stage kind", kind)
            _check_name(plugin, "stage", name)
            if kind == "model":
                raise PluginError(
                    f"plugin {plugin!r} registered a stage of kind 'model'; "
                    "architectures are registered with the register_models hook"
                )
            _check_callable(plugin, f"stage {kind}/{name}", run)
            params = _check_params(plugin, f"stage {kind}/{name}", params)
            default_needs, default_provides = STAGE_DEFAULTS.get(kind, ((), ()))
            what = f"stage {kind}/{name}"
            needs = _check_names(plugin, f"needs of {what}", needs, default_needs)
            provides = _check_names(plugin, f"provides of {what}", provides, default_provides)
            table = self.stages.setdefault(kind, {})
            if name in table:
                _duplicate(f"stage '{name}' of kind '{kind}'", table[name].plugin, plugin)
            table[name] = StageEntry(
                kind, name, run, params, description, plugin, bool(runs_previous), needs, provides
            )

        return register

    def model_registrar(self, plugin: str) -> hookspecs.ModelRegistrar:
        def register(
            name: str,
            build: Any,
            params: type[Params] | None = None,
            description: str = "",
            task: str = "generic",
            loss_weights: Sequence[str] = (),
            plots: Any = None,
            example_params: Mapping[str, Any] | None = None,
            callbacks: Any = None,
            example_data: Any = None,
            xla: bool = True,
        ) -> None:
            _check_name(plugin, "model", name)
            _check_callable(plugin, f"model {name}", build)
            if plots is not None:
                _check_callable(plugin, f"plots of model {name}", plots)
            if callbacks is not None:
                _check_callable(plugin, f"callbacks of model {name}", callbacks)
            if example_data is not None:
                _check_callable(plugin, f"example_data of model {name}", example_data)
            params = _check_params(plugin, f"model {name}", params)
            if isinstance(loss_weights, str) or not all(isinstance(t, str) for t in loss_weights):
                raise PluginError(
                    f"plugin {plugin!r}: loss_weights of model {name!r} must be a list of names"
                )
            if not isinstance(xla, bool):
                raise PluginError(
                    f"plugin {plugin!r}: xla of model {name!r} must be true or false, got {xla!r}"
                )
            if name in self.models:
                _duplicate(f"model '{name}'", self.models[name].plugin, plugin)
            self.models[name] = ModelEntry(
                name, build, params, description, plugin, task, tuple(loss_weights), plots,
                example_params, callbacks, example_data, xla,
            )

        return register

    def strategy_registrar(self, plugin: str) -> hookspecs.StrategyRegistrar:
        def register(
            name: str, create: Any, params: type[Params] | None = None, description: str = ""
        ) -> None:
            _check_name(plugin, "strategy", name)
            _check_callable(plugin, f"strategy {name}", create)
            params = _check_params(plugin, f"strategy {name}", params)
            if name in self.strategies:
                _duplicate(f"strategy '{name}'", self.strategies[name].plugin, plugin)
            self.strategies[name] = StrategyEntry(name, create, params, description, plugin)

        return register

    # -- lookups ------------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        return sorted({*self.stages, "model"})

    def stage_names(self, kind: str) -> list[str]:
        if kind == "model":
            return sorted(self.models)
        return sorted(self.stages.get(kind, {}))

    def lookup_stage(self, kind: str, name: str) -> StageEntry | None:
        """The implementation of ``kind``/``name``. For ``model`` stages this is the
        generic model-building stage with the architecture's params schema."""
        if kind == "model":
            model = self.models.get(name)
            if model is None:
                return None
            needs, provides = STAGE_DEFAULTS["model"]
            return StageEntry(
                "model", name, MODEL_STAGE_RUN, model.params, model.description, model.plugin,
                needs=needs, provides=provides,
            )
        return self.stages.get(kind, {}).get(name)

    def providers(self, what: str) -> list[str]:
        """The stage kinds with an implementation that provides ``what`` without
        needing it first (``model`` for "model", ``train`` for "trained_model")."""
        kinds = {
            kind for kind, table in self.stages.items() for e in table.values()
            if what in e.provides and what not in e.needs
        }
        model_needs, model_provides = STAGE_DEFAULTS["model"]
        if self.models and what in model_provides and what not in model_needs:
            kinds.add("model")
        return sorted(kinds)


def _check_name(plugin: str, what: str, name: Any) -> None:
    if not isinstance(name, str) or not name or not set(name) <= NAME_OK:
        raise PluginError(
            f"plugin {plugin!r} registered a {what} with an invalid name {name!r}: "
            "use lowercase letters, digits, '_' and '-'"
        )


def _check_names(
    plugin: str, what: str, names: Sequence[str] | None, default: tuple[str, ...]
) -> tuple[str, ...]:
    """``needs``/``provides`` of a stage: ``None`` means the kind's default."""
    if names is None:
        return default
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise PluginError(
            f"plugin {plugin!r}: {what} must be a list of names such as ['data', 'model'], "
            f"got {names!r}"
        )
    return tuple(names)


def _check_callable(plugin: str, what: str, ref: Any) -> None:
    if isinstance(ref, str):
        if ":" not in ref:
            raise PluginError(
                f"plugin {plugin!r}: {what} must be a callable or a 'module:function' "
                f"string, got {ref!r}"
            )
    elif not callable(ref):
        raise PluginError(f"plugin {plugin!r}: {what} is not callable: {ref!r}")


def _check_params(plugin: str, what: str, params: Any) -> type[Params]:
    if params is None:
        return NoParams
    if not (inspect.isclass(params) and issubclass(params, Params)):
        raise PluginError(
            f"plugin {plugin!r}: params of {what} must be a dlpipe.Params subclass, "
            f"got {params!r}"
        )
    return params


def _duplicate(what: str, first: str, second: str) -> None:
    raise PluginError(
        f"{what} is registered twice: by plugin {first!r} and by plugin {second!r}; "
        f"remove one of them or block it with {BLOCK_ENV}={second}"
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass
class PluginHost:
    """A plugin manager for one pipeline, with what its plugins registered."""

    pm: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]
    #: The ``--plugins-dir`` folders this host loaded (tune workers load the same).
    plugin_dirs: list[str] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def info(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _import_file(path: Path, source: str) -> ModuleType:
    """Import a loose ``.py`` file as a module named after it."""
    module_name = f"dlpipe_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load plugin file {path} ({source})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(_import_failure(f"plugin file {path}", exc)) from exc
    return module


def _import_failure(what: str, exc: BaseException) -> str:
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        frame_file = tb.tb_frame.f_code.co_filename
        if "importlib" not in frame_file:
            where = f" (at {frame_file}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{what} failed to import: {type(exc).__name__}: {exc}{where}"


def _dist_version(module: ModuleType) -> str | None:
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


class _Loader:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.infos: list[PluginInfo] = []
        self.blocked = _blocked()

    def add(self, plugin: object, name: str, source: str, origin: str, version: str | None) -> None:
        if name in self.blocked:
            return
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            existing = next((i for i in self.infos if i.name == name), None)
            if existing is not None and existing.origin == origin:
                return  # the same plugin named twice (e.g. in the folder and the spec)
            raise PluginError(
                f"two plugins are both named {name!r}: {existing.origin if existing else '?'} "
                f"({existing.source if existing else '?'}) and {origin} ({source}); rename one"
            )
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin {name!r} from {origin} is invalid: {exc}") from exc
        hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self.infos.append(PluginInfo(name, source, origin, version, hooks))

    def add_module(self, module_name: str, source: str, name: str | None = None) -> None:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(_import_failure(f"plugin module {module_name!r} ({source})", exc)) from exc
        version = _dist_version(module)
        if source == "builtin":
            from dlpipe import __version__ as version
        self.add(module, name or module_name, source, module_name, version)

    def add_entry_points(self) -> None:
        if os.environ.get(DISABLE_ENTRY_POINTS_ENV) == "1":
            return
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.blocked:
                continue
            dist = getattr(ep, "dist", None)
            dist_label = f"{dist.name} {dist.version}" if dist is not None else ep.value
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    _import_failure(f"entry point {ep.name!r} = {ep.value!r} ({dist_label})", exc)
                ) from exc
            version = dist.version if dist is not None else _dist_version(plugin)
            self.add(plugin, ep.name, "entrypoint", dist_label, version)

    def add_directory(self, directory: Path, source: str = "plugins-dir") -> None:
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_") or path.stem in self.blocked:
                continue
            module = _import_file(path, source)
            self.add(module, path.stem, source, str(path), _dist_version(module))

    def add_spec_entry(self, entry: str, base_dir: Path) -> None:
        if entry.endswith(".py") or "/" in entry or os.sep in entry:
            path = Path(entry)
            if not path.is_absolute():
                path = base_dir / path
            try:
                exists = path.is_file()
            except (OSError, ValueError) as exc:  # a name too long, a NUL byte
                reason = getattr(exc, "strerror", None) or exc
                raise PluginError(f"plugin file {entry!r} listed in the spec: {reason}") from None
            if not exists:
                raise PluginError(f"plugin file {entry!r} listed in the spec does not exist ({path})")
            module = _import_file(path, "spec")
            self.add(module, path.stem, "spec", str(path), _dist_version(module))
        else:
            self.add_module(entry, "spec", name=entry)


#: The built-in stage, strategy and tracking plugins. Each is an ordinary plugin
#: package: it implements hooks from :mod:`dlpipe.hookspecs` with ``@hookimpl`` exactly
#: as a third-party package would, and keeps TensorFlow out of its imports by
#: registering ``"module:function"`` strings.
BUILTIN_STAGE_PLUGINS: tuple[str, ...] = (
    "dlpipe.stages.data",
    "dlpipe.stages.shapes",
    "dlpipe.stages.sequences",
    "dlpipe.stages.captions",
    "dlpipe.stages.augment",
    "dlpipe.stages.train",
    "dlpipe.stages.evaluate",
    "dlpipe.stages.reports",
    "dlpipe.stages.tune",
    "dlpipe.strategies",
    "dlpipe.tracking",
)


def builtin_architectures() -> tuple[str, ...]:
    """The architecture packages, ``dlpipe.models.<name>``: every sub-package of
    :mod:`dlpipe.models` is one, so a new architecture is a new folder and nothing else.
    Found without importing them."""
    import dlpipe.models

    return tuple(
        f"dlpipe.models.{info.name}"
        for info in sorted(pkgutil.iter_modules(dlpipe.models.__path__), key=lambda i: i.name)
        if info.ispkg
    )


def builtin_plugins() -> tuple[str, ...]:
    """Every built-in plugin module, in load order: stages, then architectures."""
    return BUILTIN_STAGE_PLUGINS + builtin_architectures()




def builtin_name(module_name: str) -> str:
    """``dlpipe.stages.data`` is listed as plugin ``dlpipe.data``."""
    return "dlpipe." + module_name.rsplit(".", 1)[-1]


def load_plugins(
    *,
    plugin_dirs: Sequence[str | Path] | None = None,
    spec_plugins: Iterable[str] = (),
    spec_dir: str | Path = ".",
    extra: Iterable[object] = (),
    entry_points: bool = True,
    builtins: bool = True,
) -> PluginHost:
    """Build a fresh plugin manager and registry.

    :param plugin_dirs: folders of ``.py`` plugins; ``None`` means ``./plugins`` if
        it exists.
    :param spec_plugins: the spec's ``plugins:`` list; paths are relative to ``spec_dir``.
    :param extra: in-process plugin objects (tests use this).
    """
    pm = new_plugin_manager()
    loader = _Loader(pm)
    if builtins:
        for module_name in builtin_plugins():
            loader.add_module(module_name, "builtin", name=builtin_name(module_name))
    if entry_points:
        loader.add_entry_points()
    if plugin_dirs is None:
        default = Path("plugins")
        dirs = [default] if default.is_dir() else []
    else:
        dirs = [Path(d) for d in plugin_dirs]
    for directory in dirs:
        if not directory.is_dir():
            raise PluginError(f"plugins directory {str(directory)!r} does not exist")
        loader.add_directory(directory)
    for entry in spec_plugins:
        loader.add_spec_entry(entry, Path(spec_dir))
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"in-process-{i}"
        loader.add(plugin, str(name), "in-process", repr(plugin), _dist_version(plugin))  # type: ignore[arg-type]

    registry = Registry()
    _collect(pm, registry)
    return PluginHost(pm, registry, loader.infos, [str(d.resolve()) for d in dirs])


def _collect(pm: pluggy.PluginManager, registry: Registry) -> None:
    """Call each registration hook once per plugin, with a callback bound to it."""
    registrars: dict[str, Callable[[str], Any]] = {
        "register_stages": registry.stage_registrar,
        "register_models": registry.model_registrar,
        "register_strategies": registry.strategy_registrar,
    }
    for hook_name, make_registrar in registrars.items():
        caller = getattr(pm.hook, hook_name)
        # get_hookimpls() lists implementations in load order (pluggy calls them LIFO).
        for impl in caller.get_hookimpls():
            try:
                impl.function(register=make_registrar(impl.plugin_name))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

