"""Engine features for model stages: context-aware builders, several model stages in
one run, and the spec's ``precision`` (Keras dtype policy)."""

from __future__ import annotations

import pytest

from dlpipe import Params, hookimpl
from dlpipe.engine import run_pipeline
from dlpipe.plugins import load_plugins
from dlpipe.spec import load_yaml, validate
from dlpipe.stages.model import wants_context

pytestmark = pytest.mark.slow

SPEC = """\
name: two-models
experiment: tests
seed: 3
precision: %(precision)s
tracking: {enabled: false}
stages:
  - {kind: data, use: sklearn_digits, params: {limit: 200}}
  - {kind: model, name: first, use: vae, params: {hidden: [16], latent_dim: 2}}
  - {kind: train, name: fit_first, use: keras_fit, params: {epochs: 1, verbose: 0, save_model: false}}
  - {kind: model, name: second, use: reuses_first}
  - {kind: train, name: fit_second, use: keras_fit, params: {epochs: 1, verbose: 0, save_model: false}}
"""


class ReusesFirst:
    """An architecture whose builder takes the run context and reads an earlier model."""

    __name__ = "reuses_first"

    def __init__(self) -> None:
        self.seen: list[object] = []

    class P(Params):
        pass

    @hookimpl
    def register_models(self, register):
        def build(params, data, context):
            import keras

            self.seen.append(None if context is None else context.models.get("first"))
            inputs = keras.Input(data.input_shape)
            flat = keras.layers.Flatten()(inputs)
            return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(flat))

        register("reuses_first", build, self.P, task="classification")


def run(precision: str = "float32"):
    plugin = ReusesFirst()
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[plugin])
    spec = validate(load_yaml(SPEC % {"precision": precision}, "two.yaml"), host.registry)
    return plugin, run_pipeline(spec, host)


def test_builder_with_context_sees_earlier_models(workdir):
    plugin, ctx = run()
    first = ctx.models["first"]
    assert plugin.seen == [first]
    assert set(ctx.models) == {"first", "second"} and ctx.model is ctx.models["second"]
    # The second train stage compiled the classifier with the classification default
    # loss, so model_entry followed the current stage, not the first model stage.
    assert "accuracy" in ctx.history


def test_wants_context_by_signature():
    assert wants_context(lambda params, data, context: None)
    assert wants_context(lambda params, data, *, context=None: None)
    assert not wants_context(lambda params, data: None)


def test_precision_sets_the_dtype_policy_per_run(workdir):
    import keras

    _, ctx = run("mixed_float16")
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    model = ctx.models["second"]
    assert model.layers[-1].compute_dtype == "float16"
    assert model.layers[-1].kernel.dtype == "float32"
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    _, ctx = run("float32")  # the next run resets it
    assert keras.mixed_precision.global_policy().name == "float32"


def test_unknown_precision_is_a_spec_error():
    host = load_plugins(plugin_dirs=[], entry_points=False, extra=[ReusesFirst()])
    from dlpipe.errors import SpecError

    with pytest.raises(SpecError, match="precision"):
        validate(load_yaml(SPEC % {"precision": "float8"}, "two.yaml"), host.registry)
