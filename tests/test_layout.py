"""The package layout that docs/architecture.md describes: one folder per architecture,
each with its params class, its register_models hook, its Keras code and a pipeline;
models never import stages; plugin packages' __init__ stay free of Keras.

These checks read files and import only the light ``__init__`` modules.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from dlpipe.params import Params
from dlpipe.plugins import BUILTIN_STAGE_PLUGINS, builtin_architectures, load_plugins

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlpipe"
HEAVY = ("keras", "tensorflow", "mlflow", "optuna", "matplotlib")


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def pipeline_architectures() -> dict[str, list[str]]:
    """Architecture name -> the pipelines whose model stage uses it."""
    used: dict[str, list[str]] = {}
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for stage in doc.get("stages") or []:
            if isinstance(stage, dict) and stage.get("kind") == "model":
                used.setdefault(str(stage.get("use")), []).append(path.name)
    return used


def folder_problems(folder: Path, module_name: str) -> list[str]:
    """What an architecture folder lacks: its params class, its hook, its Keras code."""
    problems = []
    init = folder / "__init__.py"
    if not init.is_file():
        return [f"{folder.name}: no __init__.py"]
    if not (folder / "model.py").is_file():
        problems.append(f"{folder.name}: no model.py with the Keras code")
    heavy = sorted(m for m in top_level_imports(init) if m.split(".")[0] in HEAVY)
    if heavy:
        problems.append(f"{folder.name}: __init__.py imports {heavy} at module level")
    module = importlib.import_module(module_name)
    params = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Params) and obj.__module__ == module_name
    ]
    if not params:
        problems.append(f"{folder.name}: __init__.py defines no Params subclass")
    hook = getattr(module, "register_models", None)
    if hook is None or not hasattr(hook, "dlpipe_impl"):
        problems.append(f"{folder.name}: __init__.py has no @hookimpl register_models")
    return problems


def test_the_folder_check_catches_what_a_folder_lacks(tmp_path, monkeypatch):
    pkg = tmp_path / "broken_arch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import keras\n\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "keras", object())
    problems = folder_problems(pkg, "broken_arch")
    assert any("no model.py" in p for p in problems)
    assert any("no Params subclass" in p for p in problems)
    assert any("no @hookimpl register_models" in p for p in problems)
    assert any("imports ['keras']" in p for p in problems)


@pytest.mark.parametrize("module_name", builtin_architectures())
def test_each_architecture_folder_is_complete(module_name):
    folder = PACKAGE / Path(*module_name.split(".")[1:])
    assert folder_problems(folder, module_name) == []


def test_every_subfolder_of_models_is_an_architecture():
    folders = {p.parent.name for p in (PACKAGE / "models").glob("*/__init__.py")}
    assert {m.rsplit(".", 1)[-1] for m in builtin_architectures()} == folders
    assert len(folders) >= 20


def test_each_builtin_architecture_has_its_code_in_its_folder_a_pipeline_and_a_readme_row():
    host = load_plugins(plugin_dirs=[], entry_points=False)
    used = pipeline_architectures()
    readme = (ROOT / "README.md").read_text()
    packages = set(builtin_architectures())
    builtin = [m for m in host.registry.models.values() if m.plugin.startswith("dlpipe.")]
    assert len(builtin) >= 25
    for entry in builtin:
        info = host.info(entry.plugin)
        assert info is not None and info.origin in packages, entry.name
        assert isinstance(entry.build, str) and entry.build.startswith(info.origin + "."), (
            f"{entry.name}: its build function {entry.build!r} is outside {info.origin}"
        )
        assert used.get(entry.name), f"no pipeline in pipelines/ uses architecture {entry.name!r}"
        assert re.search(rf"^\| `{re.escape(entry.name)}` \|", readme, re.M), (
            f"README.md's architecture table has no row for {entry.name!r}"
        )


def test_models_and_datasets_never_import_stages():
    offenders = []
    for folder in ("models", "datasets"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            bad = sorted(m for m in all_imports(path) if m.startswith("dlpipe.stages"))
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {bad}")
    assert offenders == []


@pytest.mark.parametrize("module_name", BUILTIN_STAGE_PLUGINS)
def test_stage_plugin_packages_register_without_heavy_imports(module_name):
    path = PACKAGE / Path(*module_name.split(".")[1:]) / "__init__.py"
    assert path.is_file(), f"{module_name} is not a package"
    heavy = sorted(m for m in top_level_imports(path) if m.split(".")[0] in HEAVY)
    assert heavy == []
