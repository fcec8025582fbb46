"""The figures of ``gan``, ``cgan`` and ``wgan_gp`` after training: the fixed-noise
sample grid and the histogram of the discriminator's (critic's) scores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.models import grids
from dlpipe.models.adversarial import AdversarialModel
from dlpipe.models.gan.model import GAN


def plot_scores(model: AdversarialModel, data: DataBundle, split: str, what: str) -> Any:
    """Histogram of the discriminator's (critic's) scores of real and generated data."""
    n = min(data.size(split), 1000)
    x = np.asarray(data.x[split][:n], dtype="float32")
    labels = grids.labels_of(data, split) if model.conditional else None
    labels = labels[:n] if labels is not None else None
    z = model.fixed_latent(n)
    fake = ops.convert_to_numpy(model.generate(z, labels, training=False))
    real_scores = ops.convert_to_numpy(model.discriminate(x, labels)).ravel()
    fake_scores = ops.convert_to_numpy(model.discriminate(fake, labels)).ravel()
    if what == "probability":
        real_scores = 1.0 / (1.0 + np.exp(-real_scores))
        fake_scores = 1.0 / (1.0 + np.exp(-fake_scores))
    fig = grids.figure(6, 4)
    ax = fig.subplots()
    bins = np.linspace(
        min(real_scores.min(), fake_scores.min()), max(real_scores.max(), fake_scores.max()), 40
    )
    ax.hist(real_scores, bins=bins, alpha=0.6, label=f"real ({split})")
    ax.hist(fake_scores, bins=bins, alpha=0.6, label="generated")
    ax.set_xlabel(f"discriminator {what}" if what == "probability" else "critic score")
    ax.set_ylabel("count")
    ax.legend()
    return fig


def plots(context: Any, model: AdversarialModel, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``samples.png`` (the final fixed-noise grid, one row
    per class for a conditional GAN; image data only) and ``scores.png``."""
    if data.is_image:
        title = "samples by class" if model.conditional else "samples (fixed noise)"
        samples = grids.named_rows(model.sample_grid(), data.class_names)
        yield "samples.png", grids.sample_grid_figure(samples, grids.value_range_of(data), title)
    yield (
        "scores.png",
        plot_scores(
            model,
            data,
            grids.first_split(data),
            "probability" if isinstance(model, GAN) else "score",
        ),
    )
