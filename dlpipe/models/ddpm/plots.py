"""The figures of ``ddpm`` and ``latent_diffusion``: the final sample grid and the
denoising trajectory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dlpipe.data import DataBundle
from dlpipe.models import grids
from dlpipe.models.ddpm.model import DiffusionModel, sample_grid


def trajectory_figure(model: DiffusionModel, n: int = 4, frames: int = 8, seed: int = 1) -> Any:
    """``n`` samples (rows) from pure noise to the result (columns), as ``x_t`` in data
    space; conditional models show one class per row with the model's guidance."""
    labels = model.default_labels(n)
    _, trajectory = model.sample(n, labels, seed=seed, keep=frames)
    fig = grids.figure(1.0 * len(trajectory) + 0.6, 1.0 * n + 0.6)
    axes = fig.subplots(n, len(trajectory), squeeze=False)
    for col, (label, x) in enumerate(trajectory):
        shown = grids.to_display(model.to_data(x), model.value_range)
        for row in range(n):
            grids.show(axes[row, col], shown[row])
        axes[0, col].set_title(label, fontsize=8)
    if labels is not None:
        for row in range(n):
            axes[row, 0].set_axis_on()
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
            axes[row, 0].set_ylabel(f"class {labels[row]}", fontsize=8)
    fig.suptitle(f"denoising trajectory ({model.sampler})", fontsize=9)
    return fig


def plots(context: Any, model: DiffusionModel, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``samples.png`` (the final grid, one row per class when
    conditional) and ``trajectory.png`` (x_t along the reverse process), image data only."""
    if not data.is_image:
        return
    title = "samples by class" if model.conditional else "samples"
    samples = grids.named_rows(sample_grid(model), data.class_names)
    figure = grids.sample_grid_figure(samples, model.value_range, f"{title} ({model.sampler})")
    yield "samples.png", figure
    yield "trajectory.png", trajectory_figure(model)
