"""The figures of ``cvae``: the VAE's (:mod:`dlpipe.models.vae.plots`), conditioned on
the class labels, and the by-class sample grid."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models import grids
from dlpipe.models.cvae.model import CVAE
from dlpipe.models.vae import plots as vae_plots


def plots(context: Any, model: CVAE, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: yields ``(filename, figure)``.

    Image data: ``reconstructions.png``, ``samples_by_class.png`` (one row per class)
    and ``latent_traversal.png`` (as the first class of the split); always
    ``latent_scatter.png``, which for a good CVAE shows classes mixed, not clustered:
    the label is given to the decoder, so ``z`` need not encode it.
    """
    split = grids.first_split(data)
    x = np.asarray(data.x[split], dtype="float32")
    y = grids.labels_of(data, split)
    if y is None:
        raise ConfigError("cvae plots: the data split has no labels")
    vrange = grids.value_range_of(data)
    names = list(getattr(data, "class_names", None) or [])
    if data.is_image:
        yield "reconstructions.png", vae_plots.plot_reconstructions(model, x, vrange, y)
        title = "samples by class (same z down each column)"
        figure = grids.sample_grid_figure(model.sample_grid(names), model.value_range, title)
        yield "samples_by_class.png", figure
    yield "latent_scatter.png", vae_plots.plot_latent_scatter(model, x, y, labels=y)
    if data.is_image:
        first = int(y[0])
        name = names[first] if first < len(names) else str(first)
        yield (
            "latent_traversal.png",
            vae_plots.plot_latent_traversal(model, x, y, title=f"class {name}"),
        )
