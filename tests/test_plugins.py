"""Plugin discovery (entry points, folder, spec list), registration and listing."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from dlpipe import Params, hookimpl
from dlpipe.cli import main
from dlpipe.errors import PluginError
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, spec_plugins, validate

PLUGIN_SOURCE = textwrap.dedent(
    """\
    from dlpipe import Params, hookimpl

    __version__ = "{version}"

    class P(Params):
        width: int = 4

    def build(params, data):
        import keras

        return keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(params.width)])

    @hookimpl
    def register_models(register):
        register("{model}", build=build, params=P, description="test model")
    """
)


def write_plugin(folder, stem, model, version="1.2.3"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(PLUGIN_SOURCE.format(model=model, version=version))
    return path


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An 'installed' package: a module plus dist-info metadata on sys.path."""
    site = tmp_path / "site"
    write_plugin(site, "dlpipe_fancy", "fancy_net", version="2.0.0")
    info = site / "dlpipe_fancy-2.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dlpipe-fancy\nVersion: 2.0.0\n")
    (info / "entry_points.txt").write_text("[dlpipe]\nfancy = dlpipe_fancy\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("dlpipe_fancy", None)


def test_builtins_register_through_the_public_hooks(host):
    names = {p.name for p in host.plugins}
    assert {"dlpipe.data", "dlpipe.train", "dlpipe.tracking", "dlpipe.vae"} <= names
    assert host.registry.models["vae"].plugin == "dlpipe.vae"
    assert host.registry.stages["train"]["keras_fit"].plugin == "dlpipe.train"
    assert set(host.registry.strategies) >= {"auto", "cpu", "one_device", "mirrored"}
    tracking = host.info("dlpipe.tracking")
    assert {"before_run", "after_run", "on_run_error", "on_metrics"} <= set(tracking.hooks)


def test_entry_point_discovery(fake_distribution):
    host = load_plugins(plugin_dirs=[])
    info = host.info("fancy")
    assert info is not None and info.source == "entrypoint"
    assert info.version == "2.0.0" and "dlpipe-fancy 2.0.0" in info.origin
    assert host.registry.models["fancy_net"].plugin == "fancy"
    assert "fancy_net" not in load_plugins(plugin_dirs=[], entry_points=False).registry.models


def test_entry_points_can_be_blocked(fake_distribution, monkeypatch):
    monkeypatch.setenv("DLPIPE_BLOCK_PLUGINS", "fancy")
    assert "fancy_net" not in load_plugins(plugin_dirs=[]).registry.models


def test_plugins_folder(tmp_path, monkeypatch):
    write_plugin(tmp_path / "plugins", "local_one", "local_net")
    monkeypatch.chdir(tmp_path)
    host = load_plugins(entry_points=False)  # ./plugins by default
    assert host.registry.models["local_net"].plugin == "local_one"
    assert host.info("local_one").source == "plugins-dir"
    other = tmp_path / "elsewhere"
    write_plugin(other, "far", "far_net")
    host = load_plugins(plugin_dirs=[other], entry_points=False)
    assert "far_net" in host.registry.models and "local_net" not in host.registry.models


def test_missing_plugins_dir_is_an_error(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins(plugin_dirs=[tmp_path / "nope"], entry_points=False)


def test_spec_plugins_list_by_path_and_module(tmp_path, monkeypatch):
    write_plugin(tmp_path / "mine", "by_path", "path_net")
    write_plugin(tmp_path / "mods", "by_module_plugin", "module_net")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    text = textwrap.dedent(
        """\
        name: s
        plugins: [mine/by_path.py, by_module_plugin]
        stages:
          - {kind: data, use: sklearn_digits}
          - {kind: model, use: path_net, params: {width: 8}}
          - {kind: model, use: module_net, name: second}
        """
    )
    doc = load_yaml(text, str(tmp_path / "s.yaml"))
    host = load_plugins(
        plugin_dirs=[], spec_plugins=spec_plugins(doc), spec_dir=tmp_path, entry_points=False
    )
    spec = validate(doc, host.registry)
    assert spec.stage("model").params.width == 8
    assert host.info("by_path").source == "spec" and host.info("by_module_plugin").source == "spec"
    sys.modules.pop("by_module_plugin", None)


def test_missing_spec_plugin_file(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins(plugin_dirs=[], spec_plugins=["nope.py"], spec_dir=tmp_path)


def test_broken_plugin_file_names_the_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(PluginError) as info:
        load_plugins(plugin_dirs=[folder], entry_points=False)
    assert "broken.py" in str(info.value) and "no_such_module_here" in str(info.value)


def test_duplicate_model_name_names_both_plugins(tmp_path):
    write_plugin(tmp_path / "p", "first", "twin")
    write_plugin(tmp_path / "p", "second", "twin")
    with pytest.raises(PluginError) as info:
        load_plugins(plugin_dirs=[tmp_path / "p"], entry_points=False)
    assert "model 'twin' is registered twice" in str(info.value)
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


def test_duplicate_of_a_builtin_name(host):
    class Clash:
        __name__ = "clash"

        @hookimpl
        def register_stages(self, register):
            register("train", "keras_fit", lambda ctx, p: None)

    with pytest.raises(PluginError, match="'dlpipe.train' and by plugin 'clash'"):
        load_plugins(plugin_dirs=[], entry_points=False, extra=[Clash()])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "Bad Name", "m:f"), "invalid name"),
        (("train", "ok", "no_colon"), "'module:function'"),
        (("train", "ok", 42), "not callable"),
        (("train", "ok", "m:f", dict), "dlpipe.Params subclass"),
        (("model", "ok", "m:f"), "register_models"),
    ],
)
def test_register_validates_its_arguments(args, message):
    class Bad:
        __name__ = "bad"

        @hookimpl
        def register_stages(self, register):
            register(*args)

    with pytest.raises(PluginError, match=message):
        load_plugins(plugin_dirs=[], entry_points=False, extra=[Bad()])


def test_each_manager_is_fresh():
    class Extra:
        __name__ = "extra"

        class P(Params):
            pass

        @hookimpl
        def register_stages(self, register):
            register("data", "extra_data", lambda ctx, p: None, self.P)

    with_extra = load_plugins(plugin_dirs=[], entry_points=False, extra=[Extra()])
    without = load_plugins(plugin_dirs=[], entry_points=False)
    assert "extra_data" in with_extra.registry.stages["data"]
    assert "extra_data" not in without.registry.stages["data"]
    assert with_extra.pm is not without.pm


def test_string_references_resolve_lazily(host):
    entry = host.registry.models["vae"]
    assert entry.build == "dlpipe.models.vae.model:build"  # nothing imported at registration


def test_dlpipe_plugins_lists_everything(tmp_path, monkeypatch, capsys, fake_distribution):
    write_plugin(tmp_path / "plugins", "dropped_in", "dropped_net")
    monkeypatch.chdir(tmp_path)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "dropped_in 1.2.3  [plugins-dir: plugins/dropped_in.py]" in out
    assert "models:     dropped_net" in out
    assert "fancy 2.0.0  [entrypoint: dlpipe-fancy 2.0.0]" in out
    assert "dlpipe.train 0.1.0  [builtin: dlpipe.stages.train]" in out
    assert "stages:     train/keras_fit" in out
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["dropped_in"]["models"] == ["dropped_net"]
    assert rows["dlpipe.tracking"]["hooks"] == [
        "after_run", "before_run", "before_stage", "on_artifact", "on_metrics", "on_run_error",
    ]
