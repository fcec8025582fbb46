from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def host():
    """A fresh plugin manager with the built-ins only (no folder, no entry points)."""
    from dlpipe.plugins import load_plugins

    return load_plugins(plugin_dirs=[], entry_points=False)


@pytest.fixture(scope="session")
def builtin_host():
    """The built-ins, loaded once and shared by tests that only build and train
    architectures (tests of plugin loading use the fresh ``host``)."""
    from dlpipe.plugins import load_plugins

    return load_plugins(plugin_dirs=[], entry_points=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder whose mlruns/ is private to the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DLPIPE_HOME", raising=False)
    return tmp_path
