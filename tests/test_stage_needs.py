"""Stages declare what they need and provide; validate checks the order of a spec."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from dlpipe import hookimpl
from dlpipe.errors import PluginError, SpecError
from dlpipe.plugins import STAGE_DEFAULTS, load_plugins
from dlpipe.spec import load_yaml, validate

DATA = "  - kind: data\n    use: sklearn_digits\n"
MODEL = "  - kind: model\n    use: mlp\n"
TRAIN = "  - kind: train\n    use: keras_fit\n"
EVALUATE = "  - kind: evaluate\n    use: keras_evaluate\n"


def spec(*stages: str) -> str:
    return "name: t\nstages:\n" + "".join(stages)


def problems(text: str, registry) -> str:
    with pytest.raises(SpecError) as info:
        validate(load_yaml(text, "s.yaml"), registry)
    return str(info.value)


def test_every_pipeline_in_the_repo_is_in_order(host, repo):
    for path in sorted(Path(repo / "pipelines").glob("*.yaml")):
        if "digit_mlp" in path.name:
            continue  # its model comes from the plugins/ folder
        validate(load_yaml(path.read_text(), str(path)), host.registry)


def test_builtin_stages_declare_their_needs(host):
    reg = host.registry
    assert reg.lookup_stage("data", "sklearn_digits").provides == ("data",)
    assert reg.lookup_stage("augment", "keras_layers").needs == ("data",)
    model = reg.lookup_stage("model", "mlp")
    assert (model.needs, model.provides) == (("data",), ("model",))
    train = reg.lookup_stage("train", "keras_fit")
    assert (train.needs, train.provides) == (("data", "model"), ("trained_model",))
    for name in reg.stage_names("evaluate"):
        assert reg.lookup_stage("evaluate", name).needs == ("data", "model")
    tokenize = reg.lookup_stage("tokenize", "tokenizer")
    assert (tokenize.needs, tokenize.provides) == (("data",), ("data",))
    assert reg.lookup_stage("tune", "optuna").needs == STAGE_DEFAULTS["tune"][0]


def test_train_without_a_model_names_what_to_add(host):
    msg = problems(spec(DATA, TRAIN, EVALUATE), host.registry)
    assert "s.yaml:5:5: stages[1].kind (train): stage 'train' needs 'model', which no " \
           "stage before it provides" in msg
    assert "expected: a model stage before 'train' (it provides 'model')" in msg
    assert "got:      before it: data (data/sklearn_digits)" in msg
    assert "stage 'evaluate' needs 'model'" in msg


def test_model_before_data_says_which_stage_to_move(host):
    msg = problems(spec(MODEL, DATA, TRAIN), host.registry)
    assert "s.yaml:3:5: stages[0].kind (model): stage 'model' needs 'data'" in msg
    assert "expected: stage 'data' (stages[1], provides 'data') moved before 'model'" in msg
    assert "got:      no stage before it" in msg
    assert "1 problem in" in msg  # train after both is fine


def test_evaluate_with_nothing_to_evaluate(host):
    msg = problems(spec(EVALUATE), host.registry)
    assert "stage 'evaluate' needs 'data' and 'model', which no stage before it provides" in msg
    assert "a data stage before 'evaluate' (it provides 'data'); " \
           "a model stage before 'evaluate' (it provides 'model')" in msg


def test_a_broken_stage_still_provides_for_later_stages(host):
    """A data stage with a typo in ``use`` is reported once, not again by every stage."""
    msg = problems(spec(DATA.replace("sklearn_digits", "sklearn_digit"), MODEL), host.registry)
    assert "unknown data stage 'sklearn_digit'" in msg and "needs" not in msg


# -- a third-party plugin declaring its own needs ----------------------------------------


def _export(context, params):  # pragma: no cover - never run
    pass


class ExportPlugin:
    """A plugin with its own kinds: export needs a trained model, publish an export."""

    __name__ = "export_plugin"

    @staticmethod
    @hookimpl
    def register_stages(register):
        register("export", "onnx", _export, description="Export the trained model.",
                 needs=["trained_model"], provides=["exported_model"])
        register("publish", "registry", _export, description="Publish an export.",
                 needs=("exported_model",))
        register("report", "anything", _export, description="Needs nothing, say so.")
        register("evaluate", "external", _export, description="Scores files on disk.",
                 needs=())


@pytest.fixture
def plugin_host():
    return load_plugins(plugin_dirs=[], entry_points=False, extra=[ExportPlugin()])


def test_plugin_stages_get_the_same_check(plugin_host):
    reg = plugin_host.registry
    assert reg.lookup_stage("export", "onnx").needs == ("trained_model",)
    assert reg.lookup_stage("report", "anything").needs == ()  # a kind of its own
    assert reg.lookup_stage("evaluate", "external").needs == ()  # () overrides the kind
    export = "  - kind: export\n    use: onnx\n"
    publish = "  - kind: publish\n    use: registry\n"
    validate(load_yaml(spec(DATA, MODEL, TRAIN, export, publish), "s.yaml"), reg)
    validate(load_yaml(spec("  - kind: evaluate\n    use: external\n"), "s.yaml"), reg)

    msg = problems(spec(DATA, MODEL, export, publish), reg)
    assert "stage 'export' needs 'trained_model', which no stage before it provides" in msg
    assert "expected: a train stage before 'export' (it provides 'trained_model')" in msg
    assert "got:      before it: data (data/sklearn_digits), model (model/mlp)" in msg
    assert "publish" not in msg  # export is there; its own problem is reported

    msg = problems(spec(DATA, MODEL, TRAIN, publish, export), reg)
    assert "stage 'publish' needs 'exported_model'" in msg
    assert "expected: stage 'export' (stages[4], provides 'exported_model') moved " \
           "before 'publish'" in msg


def test_a_need_nobody_provides(plugin_host):
    class Lonely:
        __name__ = "lonely"

        @staticmethod
        @hookimpl
        def register_stages(register):
            register("deploy", "k8s", _export, needs=["cluster"])

    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[Lonely()])
    msg = problems(spec(DATA, "  - kind: deploy\n    use: k8s\n"), host.registry)
    assert "a stage that provides 'cluster' before 'deploy' (no registered stage does)" in msg


@pytest.mark.parametrize("bad", ["data", [1], 5, [""]])
def test_needs_must_be_a_list_of_names(bad):
    plugin = SimpleNamespace(
        __name__="bad_needs",
        register_stages=hookimpl(lambda register: register("x", "y", _export, needs=bad)),
    )
    with pytest.raises(PluginError, match=r"needs of stage x/y must be a list of names such "
                                          r"as \['data', 'model'\]"):
        load_plugins(plugin_dirs=[], entry_points=False, extra=[plugin])


def test_a_spec_file_plugin_declares_needs(tmp_path, capsys):
    """The same through the command line, with a plugin listed in the spec."""
    from dlpipe.cli import main

    (tmp_path / "exporter.py").write_text(textwrap.dedent(
        """\
        from dlpipe import hookimpl

        @hookimpl
        def register_stages(register):
            register("export", "onnx", "exporter:run", needs=["trained_model"])
        """
    ))
    (tmp_path / "s.yaml").write_text(
        "name: t\nplugins: [exporter.py]\nstages:\n" + DATA + MODEL
        + "  - kind: export\n    use: onnx\n"
    )
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "s.yaml:8:5: stages[2].kind (export): stage 'export' needs 'trained_model'" in err
