"""Every registered architecture builds, trains one step and has the right output shape.

New architecture plugins join this test just by registering; the example plugin in
plugins/ is included.
"""

from __future__ import annotations

import pytest

from dlpipe.plugins import load_plugins
from dlpipe.testing import check_architecture

HOST = load_plugins(plugin_dirs=["plugins"], entry_points=False)


@pytest.mark.parametrize("name", sorted(HOST.registry.models))
def test_architecture_conforms(name, repo, monkeypatch):
    monkeypatch.chdir(repo)
    check_architecture(HOST.registry.models[name])


def test_every_architecture_is_covered():
    assert {"vae", "digit_mlp"} <= set(HOST.registry.models)
