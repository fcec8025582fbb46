"""The ``keras_dataset`` stage: mnist, fashion_mnist or cifar10 from ``keras.datasets``
(downloaded once into the Keras cache)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.stages.data.finish import finish

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]


def keras_dataset(ctx: Any, params: Any) -> None:
    """mnist, fashion_mnist or cifar10 from ``keras.datasets``.

    The official train and test parts are joined (train first) and split again
    with this stage's fractions and seed, like every other data stage.
    """
    import keras

    name = params.dataset
    try:
        loader = getattr(keras.datasets, name).load_data
        (x_train, y_train), (x_test, y_test) = loader()
    except Exception as exc:  # offline: URL fetch failure, a partial download, ...
        raise DlpipeError(
            f"keras_dataset could not load '{name}': {exc}\n"
            f"keras.datasets downloads '{name}' once (this needs network access) into the "
            "Keras cache ~/.keras/datasets (or $KERAS_HOME/datasets) and reads it from there "
            "afterwards. Run once with network access, or work offline with the "
            "sklearn_digits or npz data stages."
        ) from exc

    x = np.concatenate([x_train, x_test]).astype(np.float32)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    y = np.concatenate([np.ravel(y_train), np.ravel(y_test)]).astype(np.int32)
    names = {"fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}
    class_names = names.get(name, [str(i) for i in range(10)])
    finish(ctx, params, name, x, y, "classification", list(class_names))

