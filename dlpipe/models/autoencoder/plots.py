"""The figures of ``autoencoder``: originals above their reconstructions (and a noisy
pair for a denoising model), and the latent codes in 2-D."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe.data import DataBundle
from dlpipe.models import grids
from dlpipe.models.autoencoder.model import Autoencoder


def plot_reconstructions(
    model: Autoencoder, x: np.ndarray, value_range: tuple[float, float], n: int = 10
) -> Any:
    """Originals above their reconstructions; a denoising model adds a noisy pair."""
    x = x[:n]
    rows = [("original", x), ("reconstruction", grids.predict_batches(model, x))]
    if model.noise_std > 0:
        rng = np.random.default_rng(0)
        noisy = (x + rng.normal(0.0, model.noise_std, x.shape)).astype("float32")
        rows += [
            (f"noisy input (std {model.noise_std:g})", noisy),
            ("denoised", grids.predict_batches(model, noisy)),
        ]
    return grids.rows_figure(rows, value_range)


def plot_latent_scatter(model: Autoencoder, x: np.ndarray, y: np.ndarray | None) -> Any:
    """Latent codes of ``x`` in 2-D (PCA when latent_dim > 2), coloured by label."""
    limit = 5000
    z = grids.predict_batches(model.encode, x[:limit]).reshape(min(len(x), limit), -1)
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2)
        points = pca.fit_transform(z)
        ratio = pca.explained_variance_ratio_
        names = (f"PC 1 ({ratio[0]:.0%})", f"PC 2 ({ratio[1]:.0%})")
        title = f"latent space (PCA of {z.shape[1]} dims)"
    elif z.shape[1] == 2:
        points, names, title = z, ("z[0]", "z[1]"), "latent space"
    else:
        points = np.concatenate([z, np.zeros_like(z)], axis=1)
        names, title = ("z[0]", ""), "latent space"
    fig = grids.figure(6, 5)
    ax = fig.subplots()
    if y is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7)
    else:
        art = ax.scatter(points[:, 0], points[:, 1], c=y[:limit], s=4, cmap="tab10", alpha=0.7)
        fig.colorbar(art, ax=ax, label="label")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(title)
    return fig


def plots(context: Any, model: Autoencoder, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``reconstructions.png`` (image data) and
    ``latent_scatter.png``. ``context`` is not used."""
    split = grids.first_split(data)
    x = np.asarray(data.x[split], dtype="float32")
    value_range = grids.value_range_of(data)
    if data.is_image:
        yield "reconstructions.png", plot_reconstructions(model, x, value_range)
    yield "latent_scatter.png", plot_latent_scatter(model, x, grids.labels_of(data, split))
