"""Full-reference image quality: PSNR and SSIM, written with ``keras.ops``.

Both functions compare a batch of images ``a`` with references ``b`` of the same shape
``(..., height, width, channels)`` and return one value per image (the leading
dimensions of the input; a single ``(h, w, c)`` image gives a scalar). They accept
NumPy arrays or backend tensors, so a model can use them inside ``train_step`` /
``test_step`` and a report can use them on NumPy arrays (``keras.ops.convert_to_numpy``
turns the result into NumPy).

**PSNR** (peak signal-to-noise ratio, in dB)::

    psnr = 10 * log10(max_val**2 / mean((a - b)**2))

over all pixels and channels of an image. Identical images have an infinite PSNR; it
is capped at :data:`PSNR_CAP` (100 dB) so that averages and logged metrics stay
finite. ``max_val`` is the width of the value range (1 for images in [0, 1], 2 for
[-1, 1], 255 for bytes); PSNR only depends on differences, so no shift is needed.

**SSIM** (structural similarity, Wang et al. 2004) compares local means, variances
and the covariance of the two images in an 11x11 Gaussian window (sigma 1.5)::

    ssim = ((2 mu_a mu_b + C1) (2 cov_ab + C2)) / ((mu_a^2 + mu_b^2 + C1) (var_a + var_b + C2))

with ``C1 = (0.01 max_val)^2`` and ``C2 = (0.03 max_val)^2``, computed per channel
over the "valid" window positions and averaged. SSIM expects images in
``[0, max_val]``: shift images in ``[low, high]`` by ``-low`` first (the luminance
term is not shift-invariant), as :func:`to_unit_range` does. Images smaller than the
window use a window as large as the image (odd side, at least 1), so tiny test images
still work; identical images always score exactly 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

#: PSNR reported for identical images (and the ceiling of every PSNR).
PSNR_CAP = 100.0

_EPS = 1e-20


def psnr(a: Any, b: Any, max_val: float = 1.0, cap: float = PSNR_CAP) -> Any:
    """Per-image PSNR in dB of ``a`` against ``b``, at most ``cap`` (float32)."""
    a = ops.cast(ops.convert_to_tensor(a), "float32")
    b = ops.cast(ops.convert_to_tensor(b), "float32")
    mse = ops.mean(ops.square(a - b), axis=(-3, -2, -1))
    value = 10.0 * ops.log10(float(max_val) ** 2 / ops.maximum(mse, _EPS))
    return ops.minimum(value, float(cap))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """A normalized ``(size, size)`` Gaussian window (float32)."""
    coords = np.arange(size, dtype="float64") - (size - 1) / 2.0
    g = np.exp(-(coords**2) / (2.0 * sigma**2))
    window = np.outer(g, g)
    return (window / window.sum()).astype("float32")


def _window_side(height: int, width: int, size: int) -> int:
    side = min(size, int(height), int(width))
    return side if side % 2 == 1 else side - 1


def ssim(
    a: Any,
    b: Any,
    max_val: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Any:
    """Per-image SSIM of ``a`` against ``b`` (images in ``[0, max_val]``), float32.

    1 for identical images, lower the more structure differs (it can be negative for
    anti-correlated images).
    """
    a = ops.cast(ops.convert_to_tensor(a), "float32")
    b = ops.cast(ops.convert_to_tensor(b), "float32")
    if len(a.shape) < 3:
        raise ValueError(f"ssim needs images (..., height, width, channels), got {a.shape}")
    ndim = len(a.shape)
    lead = ops.shape(a)[:-3]  # static ints where known, else tensors
    height, width, channels = (int(d) for d in a.shape[-3:])
    side = _window_side(height, width, window)
    kernel = ops.convert_to_tensor(gaussian_window(side, sigma)[:, :, None, None])

    def planes(x: Any) -> Any:
        # (..., h, w, c) -> (n * c, h, w, 1): every channel is filtered on its own.
        x = ops.reshape(x, (-1, height, width, channels))
        x = ops.transpose(x, (0, 3, 1, 2))
        return ops.reshape(x, (-1, height, width, 1))

    def blur(x: Any) -> Any:
        return ops.conv(x, kernel, strides=1, padding="valid")

    a, b = planes(a), planes(b)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1 = (k1 * float(max_val)) ** 2
    c2 = (k2 * float(max_val)) ** 2
    smap = ((2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    per_plane = ops.mean(smap, axis=(1, 2, 3))
    per_image = ops.mean(ops.reshape(per_plane, (-1, channels)), axis=1)
    if ndim == 3:
        return ops.reshape(per_image, ())
    return per_image if ndim == 4 else ops.reshape(per_image, lead)


def to_unit_range(x: Any, value_range: tuple[float, float]) -> tuple[Any, float]:
    """Clip ``x`` to ``value_range`` and shift it to ``[0, high - low]``.

    Returns the shifted images and ``max_val`` (``high - low``) for :func:`psnr` and
    :func:`ssim`.
    """
    low, high = float(value_range[0]), float(value_range[1])
    x = ops.clip(ops.cast(ops.convert_to_tensor(x), "float32"), low, high)
    return x - low, high - low
