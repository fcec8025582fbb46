"""The data stages of scikit-learn's bundled datasets (no network)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe.stages.data.finish import finish


def sklearn_digits(ctx: Any, params: Any) -> None:
    """scikit-learn's bundled 8x8 digits as ``(n, 8, 8, 1)`` images with values 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., np.newaxis]
    y = digits.target.astype(np.int32)
    finish(ctx, params, "sklearn_digits", x, y, "classification", [str(i) for i in range(10)])


def sklearn_iris(ctx: Any, params: Any) -> None:
    """scikit-learn's bundled iris table: ``(150, 4)`` features, 3 classes."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target.astype(np.int32)
    finish(ctx, params, "sklearn_iris", x, y, "classification", [str(n) for n in iris.target_names])

