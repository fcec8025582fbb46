"""Every hook is documented, tested, and the plugin guide's example works."""

from __future__ import annotations

import inspect
import re

import pytest

from dlpipe import hookspecs

HOOKS = sorted(
    name for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, "dlpipe_spec")
)


def test_there_are_hooks():
    assert {"register_stages", "register_models", "before_run", "on_run_error"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring_and_annotations(hook):
    fn = getattr(hookspecs, hook)
    assert fn.__doc__ and len(fn.__doc__.strip()) > 20
    signature = inspect.signature(fn)
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
    assert signature.return_annotation in (None, "None")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_in_the_plugin_guide_with_its_signature(hook, repo):
    guide = (repo / "docs" / "plugins.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({params})`" in guide


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook, repo):
    """A test (other than this file) implements or checks the hook by name."""
    sources = [
        p.read_text() for p in (repo / "tests").glob("test_*.py") if p.name != "test_hooks_meta.py"
    ]
    assert any(re.search(rf"\b{hook}\b", s) for s in sources), f"no test mentions {hook}"


def test_guide_example_plugin_works(repo, tmp_path, monkeypatch):
    guide = (repo / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(\"\"\"A wide MLP.*?)```", guide, re.S).group(1)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "wide_mlp.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    from dlpipe.cli import main
    from dlpipe.plugins import load_plugins
    from dlpipe.testing import check_architecture

    host = load_plugins(entry_points=False)
    assert host.info("wide_mlp").version == "0.1.0"
    check_architecture(host.registry.models["wide_mlp"])
    spec = re.search(r"```yaml\n(name: wide.*?)```", guide, re.S).group(1)
    (tmp_path / "wide.yaml").write_text(spec)
    assert main(["validate", "wide.yaml"]) == 0
