"""The benchmark's model: a digit MLP whose hidden layer has an L2 penalty weight.

dlpipe loads this file as a plugin (``--plugins-dir benchmarks/tune/plugins``); the
KerasTuner and plain-Optuna scripts import :func:`make_model` from it, so every
contestant trains exactly the same network.
"""

from pydantic import Field

from dlpipe import Params, hookimpl


class BenchMLPParams(Params):
    units: int = Field(64, ge=1)
    l2: float = Field(1e-4, ge=0, description="L2 penalty weight on the hidden kernel.")


def make_model(input_shape, num_classes, units=64, l2=1e-4):
    import keras

    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(units, activation="relu", kernel_regularizer=keras.regularizers.L2(l2))(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="bench_mlp")


def build(params, data):
    return make_model(data.input_shape, data.num_classes, params.units, params.l2)


@hookimpl
def register_models(register):
    register("bench_mlp", build=build, params=BenchMLPParams, task="classification",
             description="Benchmark MLP with an L2 weight.")
