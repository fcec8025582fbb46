"""An example local plugin: a small MLP digit classifier.

Any ``.py`` file in ``./plugins`` is loaded as a dlpipe plugin. This one registers an
architecture named ``digit_mlp`` that ``pipelines/digit_mlp.yaml`` uses. Keras is
imported inside ``build`` so that ``dlpipe validate`` and ``dlpipe plugins`` stay fast.
See docs/plugins.md for the walk-through.
"""

from pydantic import Field

from dlpipe import Params, hookimpl

__version__ = "0.1.0"


class DigitMLPParams(Params):
    hidden: list[int] = Field(default_factory=lambda: [128, 64], description="Layer widths.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout after each layer.")
    activation: str = "relu"


def build(params: DigitMLPParams, data):
    """Flatten the input, stack Dense+Dropout blocks, end in a softmax over the classes."""
    import keras

    inputs = keras.Input(shape=data.input_shape)
    x = keras.layers.Flatten()(inputs)
    for width in params.hidden:
        x = keras.layers.Dense(width, activation=params.activation)(x)
        x = keras.layers.Dropout(params.dropout)(x)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="digit_mlp")


@hookimpl
def register_models(register):
    register(
        "digit_mlp",
        build=build,
        params=DigitMLPParams,
        description="Example plugin: an MLP classifier (plugins/digit_mlp.py).",
        task="classification",
        example_params={"hidden": [16]},
    )
