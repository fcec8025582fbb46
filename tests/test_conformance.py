"""Every registered architecture builds, trains one step and has the right output shape,
and the model a run logs for it loads in a fresh Python process.

New architecture plugins join this test just by registering; the example plugin in
plugins/ is included. Each architecture's test also saves its model as the MLflow model
a run logs; the last test loads all of them in ONE new process (through
``mlflow.pyfunc`` only, with none of dlpipe's model modules imported beforehand) and
compares the predictions with those of the live models.
"""

from __future__ import annotations

import pytest

from dlpipe.plugins import load_plugins
from dlpipe.testing import check_architecture, check_fresh_process

HOST = load_plugins(plugin_dirs=["plugins"], entry_points=False)
NAMES = sorted(HOST.registry.models)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """Folder of the saved MLflow models, filled by test_architecture_conforms."""
    return tmp_path_factory.mktemp("packaged")


#: Architectures whose SavedModel export the fresh process checks too. Exporting costs
#: seconds per model, so CI checks one of each kind of input and output; every
#: architecture's pyfunc model is checked.
EXPORT_CHECKED = {"lenet", "mlp", "unet", "vae", "gan"}


@pytest.mark.parametrize("name", NAMES)
def test_architecture_conforms(name, repo, monkeypatch, packaged):
    monkeypatch.chdir(repo)
    check_architecture(HOST.registry.models[name], package_to=packaged / name,
                       export=name in EXPORT_CHECKED)


def test_every_architecture_loads_in_a_fresh_process(repo, monkeypatch, packaged):
    monkeypatch.chdir(repo)
    for name in NAMES:  # run alone, this test packages what the others did not
        if not (packaged / name / "MLmodel").is_file():
            check_architecture(HOST.registry.models[name], package_to=packaged / name,
                               export=name in EXPORT_CHECKED)
    reports = check_fresh_process([packaged / name for name in NAMES])
    assert set(reports) == set(NAMES)
    assert all(r["pyfunc"] == "ok" for r in reports.values())
    exported = {name for name, r in reports.items() if r["saved_model"] != "not exported"}
    # They export an inference-only SavedModel that needs no dlpipe, and it matches.
    assert exported == EXPORT_CHECKED


def test_every_architecture_is_covered():
    assert {"vae", "digit_mlp"} <= set(HOST.registry.models)
