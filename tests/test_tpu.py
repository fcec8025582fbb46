"""``strategy: tpu`` and XLA (``train.jit_compile``, ``register_models(xla=...)``).

Nothing here can run a TPU: the TPU tests replace the TensorFlow functions that
:mod:`dlpipe.strategies.tpu` calls with fakes that record the order of the calls, and
check how the errors TensorFlow raises without a TPU come out.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from dlpipe import hookimpl
from dlpipe.errors import DlpipeError, PluginError
from dlpipe.plugins import load_plugins
from dlpipe.spec import SpecError, load_yaml, validate
from dlpipe.strategies import TPUParams

# ---------------------------------------------------------------------- the TPU


def spec_with_strategy(host, strategy, precision="mixed_bfloat16"):
    doc = {
        "name": "t", "precision": precision, "strategy": strategy,
        "tracking": {"enabled": False},
        "stages": [{"kind": "data", "use": "xor"}, {"kind": "model", "use": "mlp"}],
    }
    return validate(load_yaml(yaml.safe_dump(doc, sort_keys=False), "t.yaml"), host.registry)


@pytest.fixture
def fake_tpu(monkeypatch):
    """Replace the four TensorFlow calls; ``calls`` records them in order. Set
    ``fail[step] = exception`` to make a step raise."""
    import tensorflow as tf

    calls: list[tuple[str, object]] = []
    fail: dict[str, BaseException] = {}

    def maybe_fail(step):
        if step in fail:
            raise fail[step]

    class Resolver:
        def __init__(self, tpu=None, zone=None, project=None):
            calls.append(("resolver", {"tpu": tpu, "zone": zone, "project": project}))
            maybe_fail("resolver")

    def connect(resolver):
        calls.append(("connect", resolver))
        maybe_fail("connect")

    def initialize(resolver):
        calls.append(("initialize", resolver))
        maybe_fail("initialize")

    class Strategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            calls.append(("strategy", resolver))
            maybe_fail("strategy")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", connect)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", initialize)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", Strategy)
    monkeypatch.delenv("TPU_NAME", raising=False)
    return SimpleNamespace(calls=calls, fail=fail, Strategy=Strategy)


def make(**params):
    from dlpipe.strategies.tpu import tpu_strategy

    return tpu_strategy(TPUParams(**params))


def test_named_tpu_resolves_connects_initialises_then_creates_the_strategy(fake_tpu, capsys):
    strategy = make(tpu="my-tpu", zone="us-central1-b", project="proj")
    steps = [step for step, _ in fake_tpu.calls]
    assert steps == ["resolver", "connect", "initialize", "strategy"]
    assert fake_tpu.calls[0][1] == {"tpu": "my-tpu", "zone": "us-central1-b", "project": "proj"}
    resolver = fake_tpu.calls[1][1]
    assert all(arg is resolver for _, arg in fake_tpu.calls[1:])  # one resolver throughout
    assert isinstance(strategy, fake_tpu.Strategy)
    assert "strategy: tpu tpu='my-tpu'" in capsys.readouterr().out


def test_local_tpu_is_not_connected_to(fake_tpu):
    make(tpu="local")
    assert [step for step, _ in fake_tpu.calls] == ["resolver", "initialize", "strategy"]


def test_grpc_address_is_connected_to(fake_tpu):
    make(tpu="grpc://10.0.0.2:8470")
    assert [step for step, _ in fake_tpu.calls] == ["resolver", "connect", "initialize", "strategy"]


def test_no_tpu_found_is_one_clear_error(fake_tpu):
    import tensorflow as tf

    upstream = tf.errors.NotFoundError(
        None, None, "TPUs not found in the cluster. Failed in initialization: No OpKernel "
        "was registered to support Op 'ConfigureDistributedTPU' used by {{node "
        "ConfigureDistributedTPU}} with these attrs: [" + "x" * 2000 + "]")
    fake_tpu.fail["initialize"] = upstream
    with pytest.raises(DlpipeError) as info:
        make(tpu="local")
    message = str(info.value)
    assert "tpu='local', zone=(not set), project=(not set)" in message
    assert "initialising the TPU system" in message
    assert "NotFoundError: TPUs not found in the cluster" in message
    assert "Cloud TPU VM" in message and "another strategy" in message
    assert len(message) < 1000  # TensorFlow's kilobytes of attrs are cut
    assert info.value.__cause__ is upstream
    assert [step for step, _ in fake_tpu.calls] == ["resolver", "initialize"]


def test_no_tpu_name_is_one_clear_error(fake_tpu):
    fake_tpu.fail["resolver"] = ValueError("Please provide a TPU Name to connect to.")
    with pytest.raises(DlpipeError) as info:
        make(zone="europe-west4-a")
    message = str(info.value)
    assert "tpu=(not set), zone='europe-west4-a', project=(not set)" in message
    assert "finding the TPU" in message
    assert "ValueError: Please provide a TPU Name" in message
    assert "set strategy.params.tpu" in message
    assert [step for step, _ in fake_tpu.calls] == ["resolver"]


def test_failed_connection_names_the_tpu_zone_and_project(fake_tpu):
    fake_tpu.fail["connect"] = RuntimeError("Missing runtime dependency on the Google API client.")
    with pytest.raises(DlpipeError) as info:
        make(tpu="my-tpu", zone="us-central1-b", project="proj")
    message = str(info.value)
    assert "tpu='my-tpu', zone='us-central1-b', project='proj'" in message
    assert "connecting to the TPU cluster" in message and "gcloud compute tpus list" in message


def test_tpu_params_validate_before_tensorflow(host):
    assert host.registry.strategies["tpu"].params is TPUParams
    assert "mixed_bfloat16" in host.registry.strategies["tpu"].description
    described = TPUParams.model_json_schema()
    assert "mixed_bfloat16" in described["description"]
    assert "mixed_bfloat16" in described["properties"]["tpu"]["description"]
    spec = spec_with_strategy(host, {"use": "tpu", "params": {"tpu": "my-tpu", "zone": "z"}})
    assert spec.strategy_name == "tpu" and spec.strategy_params.zone == "z"
    for params, expected in [
        ({"tpu": "local", "zone": "z"}, "zone only apply to a TPU given by name"),
        ({"tpu": "grpc://h:8470", "project": "p"}, "project only apply"),
        ({"tpu": "http://h:8470"}, "must start with grpc://"),
        ({"tpu": ""}, "at least 1 character"),
    ]:
        with pytest.raises(SpecError) as info:
            spec_with_strategy(host, {"use": "tpu", "params": params})
        assert expected in str(info.value)


def test_engine_creates_the_tpu_strategy_from_a_spec(host, fake_tpu):
    from dlpipe.engine import create_strategy

    spec = spec_with_strategy(host, {"use": "tpu", "params": {"tpu": "local"}})
    assert isinstance(create_strategy(spec, host), fake_tpu.Strategy)


def test_real_tensorflow_without_a_tpu_gives_the_clear_error(monkeypatch):
    """TensorFlow itself, on this machine that has no TPU: both upstream errors."""
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("TPU_CONFIG", raising=False)
    with pytest.raises(DlpipeError, match=r"ValueError: Please provide a TPU Name"):
        make()
    with pytest.raises(DlpipeError, match=r"NotFoundError: TPUs not found in the cluster"):
        make(tpu="local")


# --------------------------------------------------------------------------- XLA


class NoXlaPlugin:
    """An architecture registered ``xla=False`` (the mlp's code under another name)."""

    __name__ = "no_xla_plugin"

    @staticmethod
    @hookimpl
    def register_models(register):
        from dlpipe.models.mlp import MLPParams

        register("mlp_no_xla", "dlpipe.models.mlp.model:build", MLPParams,
                 task="classification", xla=False)


def test_registration_records_the_xla_flag(host):
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[NoXlaPlugin()])
    assert host.registry.models["mlp_no_xla"].xla is False
    assert host.registry.models["mlp"].xla is True  # the default

    class Bad:
        @staticmethod
        @hookimpl
        def register_models(register):
            register("bad_flag", "m:build", xla="no")

    with pytest.raises(PluginError, match="xla of model 'bad_flag' must be true or false"):
        load_plugins(plugin_dirs=[], entry_points=False, builtins=False, extra=[Bad()])


#: Built-in architectures with a train, evaluate or predict step that fails under XLA
#: on the CPU (benchmarks/results/xla_*.txt, from benchmarks/probe/xla_probe.py): the
#: super-resolution test_step's bicubic baseline has no XLA kernel (ResizeBicubic).
NOT_XLA = {"espcn", "srgan"}


def test_builtin_architectures_marked_as_the_probe_found(builtin_host):
    assert {n for n, e in builtin_host.registry.models.items() if not e.xla} == NOT_XLA


@pytest.mark.parametrize(
    ("xla", "wanted", "passed"),
    [(True, "auto", "auto"), (True, True, True), (True, False, False),
     (False, "auto", False), (False, False, False)],
)
def test_jit_compile_passed_to_compile(xla, wanted, passed):
    from dlpipe.stages.train import KerasFitParams
    from dlpipe.stages.train.compile import resolve_jit_compile

    entry = SimpleNamespace(name="arch", plugin="p", xla=xla)
    ctx = SimpleNamespace(model_entry=lambda: entry, stage=SimpleNamespace(id="train"))
    assert resolve_jit_compile(ctx, KerasFitParams(jit_compile=wanted)) == passed


def run_xor(host, model, jit):
    from dlpipe.engine import run_pipeline

    doc = {
        "name": "t", "experiment": "tests", "seed": 0, "tracking": {"enabled": False},
        "stages": [
            {"kind": "data", "use": "xor", "params": {"repeats": 4}},
            {"kind": "model", "use": model, "params": {"hidden": [4]}},
            {"kind": "train", "use": "keras_fit", "params": {
                "epochs": 1, "verbose": 0, "resume": False, "save_model": False,
                "checkpoint": {"enabled": False}, "jit_compile": jit}},
        ],
    }
    spec = validate(load_yaml(yaml.safe_dump(doc, sort_keys=False), "t.yaml"), host.registry)
    return run_pipeline(spec, host)


def test_jit_compile_true_trains_with_xla_and_refuses_an_xla_false_model(workdir, monkeypatch):
    import keras

    requested: list = []
    compile_model = keras.Model.compile

    def spy(self, *args, **kwargs):
        requested.append(kwargs.get("jit_compile"))
        return compile_model(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", spy)
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[NoXlaPlugin()])
    run_xor(host, "mlp", True)
    # What dlpipe asks of Keras; Keras itself turns XLA off again once op determinism is
    # on, which an earlier test in this process may have switched on for good.
    assert requested[-1] is True
    assert run_xor(host, "mlp_no_xla", "auto").model.jit_compile is False
    assert requested[-1] is False
    with pytest.raises(DlpipeError) as info:
        run_xor(host, "mlp_no_xla", True)
    message = str(info.value)
    assert "architecture 'mlp_no_xla'" in message and "xla=False" in message
    assert "jit_compile: auto" in message


def test_dlpipe_plugins_shows_models_without_xla(tmp_path, monkeypatch, capsys):
    from dlpipe.cli import main

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "noxla.py").write_text(
        "from dlpipe import hookimpl\n\n"
        "@hookimpl\n"
        "def register_models(register):\n"
        "    register('fast_net', 'm:build')\n"
        "    register('slow_net', 'm:build', xla=False)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLPIPE_DISABLE_ENTRY_POINTS", "1")
    assert main(["plugins"]) == 0
    assert "models:     fast_net, slow_net (no XLA)" in capsys.readouterr().out
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["noxla"]["models"] == ["fast_net", "slow_net"]
    assert rows["noxla"]["xla"] == {"fast_net": True, "slow_net": False}
