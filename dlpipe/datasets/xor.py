"""The XOR problem: two inputs, label 1 when exactly one of them is "on". NumPy only."""

from __future__ import annotations

import numpy as np

XOR_CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


def xor_points(
    layout: str, repeats: int, noise: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``4 * repeats`` float32 points ``(n, 2)`` and int32 labels ``(n,)``, shuffled.

    ``corners``: the four points (0,0), (0,1), (1,0), (1,1), each repeated ``repeats``
    times. ``cloud``: points drawn uniformly from [-1, 1]^2 and labelled by the signs of
    the two coordinates. Gaussian ``noise`` then blurs the inputs (after labelling). No
    line separates the two classes, so a network without a hidden layer cannot fit it
    and one hidden layer can.
    """
    rng = np.random.default_rng(seed)
    n = 4 * repeats
    if layout == "corners":
        x = np.tile(XOR_CORNERS, (repeats, 1))
        y = (x[:, 0] != x[:, 1]).astype(np.int32)
    else:
        x = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
        y = ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int32)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    order = rng.permutation(n)
    return x[order], y[order]
