"""The figures of ``vae``, which ``cvae`` reuses.

Reconstructions, the latent scatter, samples from the prior, the 2-D latent manifold
(``latent_dim`` 2) and a *latent traversal*: one latent dimension varied over
``[-3, 3]`` at a time, the others at 0, one row per dimension (the most used
dimensions first), which is how a beta-VAE's disentangled factors are looked at.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.models import grids
from dlpipe.models.vae.model import VAE, decode_batches, kl_divergence


def encode_batches(
    model: VAE, x: np.ndarray, labels: np.ndarray | None = None, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """``model.encode`` over ``x`` (and labels) in batches: ``(z_mean, z_log_var)``."""
    means, log_vars = [], []
    for i in range(0, len(x), batch):
        part = None if labels is None else labels[i : i + batch]
        z_mean, z_log_var = model.encode(x[i : i + batch], part, training=False)
        means.append(ops.convert_to_numpy(z_mean))
        log_vars.append(ops.convert_to_numpy(z_log_var))
    return np.concatenate(means), np.concatenate(log_vars)


def plot_reconstructions(
    model: VAE, x: np.ndarray, vrange: tuple[float, float], labels: np.ndarray | None = None
) -> Any:
    """Up to 10 inputs above their reconstructions (decoded latent means)."""
    n = min(10, len(x))
    z_mean, _ = encode_batches(model, x[:n], None if labels is None else labels[:n])
    x_hat = decode_batches(model, z_mean, None if labels is None else labels[:n])
    fig = grids.figure(0.8 * n, 1.8)
    axes = fig.subplots(2, n, squeeze=False)
    inputs, outputs = grids.to_display(x[:n], vrange), grids.to_display(x_hat, vrange)
    for i in range(n):
        grids.show(axes[0, i], inputs[i])
        grids.show(axes[1, i], outputs[i])
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    return fig


def plot_latent_manifold(model: VAE, vrange: tuple[float, float], n: int = 15) -> Any:
    """Decodes an ``n x n`` grid of ``z`` in [-2.5, 2.5]^2 (latent_dim 2 only)."""
    grid = np.linspace(-2.5, 2.5, n, dtype="float32")
    # Rows from top to bottom: z[1] decreasing; columns: z[0] increasing.
    z = np.array([[zx, zy] for zy in grid[::-1] for zx in grid], dtype="float32")
    images = decode_batches(model, z)
    fig = grids.figure(8, 8)
    ax = fig.subplots()
    grids.show(ax, grids.tile(grids.to_display(images, vrange), n, n, pad=0))
    ax.set_axis_on()
    h, w = images.shape[1:3]
    ticks = [0, n // 2, n - 1]
    ax.set_xticks([(t + 0.5) * w for t in ticks], [f"{grid[t]:.1f}" for t in ticks])
    ax.set_yticks([(t + 0.5) * h for t in ticks], [f"{grid[::-1][t]:.1f}" for t in ticks])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("latent manifold")
    return fig


def plot_latent_scatter(
    model: VAE, x: np.ndarray, y: np.ndarray | None, labels: np.ndarray | None = None
) -> Any:
    """``z_mean`` of ``x`` in 2-D (PCA when latent_dim > 2), coloured by label ``y``.

    ``labels`` are what the encoder is conditioned on (a conditional VAE), else None.
    """
    limit = 5000
    x = x[:limit]
    z_mean, _ = encode_batches(model, x, None if labels is None else labels[:limit])
    z_mean = z_mean.reshape(len(z_mean), -1)
    if z_mean.shape[1] > 2:
        centred = z_mean - z_mean.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, axis_names = centred @ vt[:2].T, ("PC 1", "PC 2")
    elif z_mean.shape[1] == 2:
        points, axis_names = z_mean, ("z[0]", "z[1]")
    else:
        points = np.concatenate([z_mean, np.zeros_like(z_mean)], axis=1)
        axis_names = ("z[0]", "")
    fig = grids.figure(6, 5)
    ax = fig.subplots()
    colour = None
    if y is not None:
        y = np.asarray(y)[:limit]
        if y.ndim > 1 and y.shape[-1] > 1:  # one-hot
            y = y.argmax(axis=-1)
        colour = y.reshape(len(y))
    if colour is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7)
    else:
        art = ax.scatter(points[:, 0], points[:, 1], c=colour, s=4, cmap="tab10", alpha=0.7)
        fig.colorbar(art, ax=ax, label="label")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("latent space (z_mean)")
    return fig


def plot_samples(model: VAE, vrange: tuple[float, float], n: int = 8, seed: int = 0) -> Any:
    """An ``n x n`` mosaic of images decoded from seeded prior samples."""
    images = ops.convert_to_numpy(model.sample(n * n, seed=seed))
    fig = grids.figure(6, 6)
    ax = fig.subplots()
    grids.show(ax, grids.tile(grids.to_display(images, vrange), n, n, pad=0))
    ax.set_title("samples from the prior")
    return fig


def latent_activity(
    model: VAE, x: np.ndarray, labels: np.ndarray | None = None, limit: int = 1000
) -> np.ndarray:
    """Mean KL per latent dimension over (up to ``limit`` of) ``x``: how much each
    dimension is used; dimensions near 0 are collapsed to the prior."""
    z_mean, z_log_var = encode_batches(model, x[:limit], None if labels is None else labels[:limit])
    return ops.convert_to_numpy(kl_divergence(z_mean, z_log_var)).mean(axis=0)


def traversal_latents(latent_dim: int, dims: Sequence[int], values: np.ndarray) -> np.ndarray:
    """``(len(dims) * len(values), latent_dim)`` codes: row ``r`` sets dimension
    ``dims[r]`` to each of ``values`` in turn, every other dimension 0."""
    z = np.zeros((len(dims), len(values), latent_dim), dtype="float32")
    for r, d in enumerate(dims):
        z[r, :, d] = values
    return z.reshape(-1, latent_dim)


def plot_latent_traversal(
    model: VAE,
    x: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    max_dims: int = 8,
    steps: int = 9,
    limit: float = 3.0,
    title: str = "latent traversal",
) -> Any:
    """Decodes ``z`` with one dimension swept over ``[-limit, limit]`` per row.

    With data ``x`` the rows are the ``max_dims`` most used dimensions (highest mean
    KL), labelled with it; without, the first ``max_dims``. ``labels`` condition the
    encoder (for the activity) and the decoder (one label per traversal image, or a
    single label for all) of a conditional VAE.
    """
    values = np.linspace(-limit, limit, steps, dtype="float32")
    if x is not None and len(x):
        kl = latent_activity(model, x, labels)
        dims = [int(d) for d in np.argsort(-kl)[:max_dims]]
        names = [f"z[{d}] KL {kl[d]:.2f}" for d in dims]
    else:
        dims = list(range(min(max_dims, model.latent_dim)))
        names = [f"z[{d}]" for d in dims]
    z = traversal_latents(model.latent_dim, dims, values)
    cond = model.class_labels(len(z), None if labels is None else labels[:1])
    images = decode_batches(model, z, cond)
    title = f"{title}: each row sweeps one z from {-limit:g} to {limit:g}, others 0"
    return grids.grid_figure(images, model.value_range, steps, title=title, row_labels=names)


def plots(context: Any, model: VAE, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: yields ``(filename, figure)``.

    ``reconstructions.png``, ``latent_manifold.png`` (latent_dim 2), ``samples.png``
    and ``latent_traversal.png`` for image data, and ``latent_scatter.png`` always.
    ``context`` is not used.
    """
    split = grids.first_split(data)
    x = np.asarray(data.x[split], dtype="float32")
    y = data.y.get(split)
    vrange = grids.value_range_of(data)
    if data.is_image:
        yield "reconstructions.png", plot_reconstructions(model, x, vrange)
        if model.latent_dim == 2:
            yield "latent_manifold.png", plot_latent_manifold(model, vrange)
    yield "latent_scatter.png", plot_latent_scatter(model, x, y)
    if data.is_image:
        yield "samples.png", plot_samples(model, vrange)
        yield "latent_traversal.png", plot_latent_traversal(model, x)
