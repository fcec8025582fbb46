"""Custom classes: the modules that define a model's Keras classes, and importing
them before a model loads."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError


def architecture_modules(plugin_dirs: list[str] | None = None) -> list[str]:
    """The modules that build every registered architecture (built-in plugins and
    installed entry-point plugins; ``plugin_dirs`` adds local plugin folders)."""
    from dlpipe.plugins import load_plugins

    host = load_plugins(plugin_dirs=plugin_dirs or [], entry_points=True)
    modules = set()
    for entry in host.registry.models.values():
        build = entry.build
        name = build.partition(":")[0] if isinstance(build, str) else getattr(build, "__module__", "")
        if name:
            modules.add(name)
    return sorted(modules)


def register_custom_objects(plugin_dirs: list[str] | None = None) -> list[str]:
    """Import the module of every registered architecture, so that its Keras classes
    are registered and ``keras.saving.load_model`` / ``mlflow.keras.load_model`` can
    rebuild any ``model.keras`` dlpipe saved. Returns the modules imported.

    One call is enough per process::

        import dlpipe.packaging, keras
        dlpipe.packaging.register_custom_objects()
        model = keras.saving.load_model("model/model.keras")
    """
    modules = architecture_modules(plugin_dirs)
    for name in modules:
        importlib.import_module(name)
    return modules


def _model_modules(model: Any) -> list[str]:
    """The non-Keras modules that define the classes inside ``model`` (itself, its
    layers, recursively)."""
    found: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        module = type(obj).__module__
        if not module.startswith(("keras", "tensorflow", "tf_keras", "builtins")) and module not in found:
            found.append(module)
        for child in getattr(obj, "layers", None) or []:
            visit(child)
        for value in list(vars(obj).values()):
            if _is_keras_layer(value):
                visit(value)

    visit(model)
    return found


def _is_keras_layer(obj: Any) -> bool:
    import keras

    return isinstance(obj, keras.layers.Layer)


def import_model_modules(modules: list[dict[str, str | None]], folder: Path | None = None) -> None:
    """Import the modules a saved model's classes come from (see :func:`describe`);
    a local plugin module is loaded from its copy under ``folder/code``."""
    for record in modules:
        name = str(record["name"])
        if name in sys.modules:
            continue
        code = record.get("file")
        if code and folder is not None and (folder / code).is_file():
            spec = importlib.util.spec_from_file_location(name, folder / code)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise DlpipeError(
                f"the model's classes are defined in module {name!r}, which cannot be "
                f"imported here ({exc}); install the plugin that provides it"
            ) from exc
