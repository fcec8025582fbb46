"""Image grids and data accessors shared by the generative models.

Figures are bare ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI
backend), which ``RunContext.log_figure`` saves as PNG. Importing this module loads
neither Keras nor matplotlib (report stages import it at module level); the functions
that need them import them when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dlpipe.errors import ConfigError

MAX_INCHES = 8.0

#: A sample grid: ``(images, columns, row labels or None)``.
SampleSet = tuple[np.ndarray, int, Sequence[str] | None]



def figure(width: float, height: float) -> Any:
    """A bare figure, at most :data:`MAX_INCHES` on each side."""
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_INCHES), min(height, MAX_INCHES)))


def to_display(images: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    """Clip ``images`` to ``value_range`` and map them to [0, 1] for ``imshow``."""
    low, high = float(value_range[0]), float(value_range[1])
    images = np.clip(np.asarray(images, dtype="float32"), low, high)
    return (images - low) / max(high - low, 1e-12)


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """``(n, h, w, c)`` images in [0, 1] -> one ``(rows*(h+pad)-pad, ..., c)`` mosaic.

    Missing cells (``n < rows * cols``) and the ``pad``-pixel gutters are white.
    """
    images = np.asarray(images, dtype="float32")
    n, h, w, c = images.shape
    out = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype="float32")
    for i in range(min(n, rows * cols)):
        r, col = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = images[i]
    return out


def show(ax: Any, image: np.ndarray) -> None:
    """Draw one ``(h, w, 1)`` or ``(h, w, 3)`` image in [0, 1] without axes."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
    ax.set_axis_off()


def grid_figure(
    images: np.ndarray,
    value_range: Sequence[float],
    cols: int,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Any:
    """A figure of ``images`` in rows of ``cols``, labelled per row when given."""
    images = to_display(images, value_range)
    rows = max(1, -(-len(images) // cols))
    h, w = images.shape[1:3]
    scale = 0.45
    fig = figure(cols * scale * w / 8 + 0.6, rows * scale * h / 8 + 0.6)
    ax = fig.subplots()
    show(ax, tile(images, rows, cols))
    if row_labels is not None:
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([(r + 0.5) * (h + 1) for r in range(rows)], list(row_labels)[:rows])
        ax.tick_params(length=0, labelsize=7)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def rows_figure(rows: Sequence[tuple[str, np.ndarray]], value_range: Sequence[float]) -> Any:
    """One row of images per ``(label, images)`` pair, e.g. originals vs reconstructions."""
    n = max(len(images) for _, images in rows)
    fig = figure(0.8 * n + 0.4, 0.9 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, images) in enumerate(rows):
        shown = to_display(images, value_range)
        for i in range(n):
            if i < len(shown):
                show(axes[r, i], shown[i])
            else:
                axes[r, i].set_axis_off()
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    return fig


def predict_batches(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int = 256) -> Any:
    """``fn`` over ``x`` in batches, as NumPy (a tuple of arrays for tuple outputs)."""
    from keras import ops

    outputs = [fn(x[i : i + batch]) for i in range(0, len(x), batch)]
    if isinstance(outputs[0], (tuple, list)):
        return tuple(
            np.concatenate([ops.convert_to_numpy(o[k]) for o in outputs])
            for k in range(len(outputs[0]))
        )
    return np.concatenate([ops.convert_to_numpy(o) for o in outputs])


def sample_grid_figure(samples: SampleSet, value_range: Sequence[float], title: str) -> Any:
    """:func:`grid_figure` of a :data:`SampleSet`."""
    images, cols, rows = samples
    return grid_figure(images, value_range, cols, title=title, row_labels=rows)


def named_rows(samples: SampleSet, class_names: Sequence[str] | None) -> SampleSet:
    """``samples`` with their class-id row labels replaced by ``class_names`` (if any)."""
    images, cols, rows = samples
    if rows is not None and class_names:
        rows = [str(class_names[int(r)]) for r in rows]
    return images, cols, rows


# --------------------------------------------------------------------------------------
# Figures logged during training
# --------------------------------------------------------------------------------------


def epoch_figure_callback(
    context: Any, every: int, figure: Callable[[int], Any], name: str = "samples"
) -> Any:
    """A Keras callback that logs ``figure(epoch)`` every ``every`` epochs (0: never) as
    ``samples/<name>_epoch_NNN.png``; ``epoch`` and NNN count from 1."""
    import keras

    every = int(every)

    def on_epoch_end(epoch: int, logs: Any = None) -> None:
        done = epoch + 1
        if every > 0 and done % every == 0:
            context.log_figure(figure(done), f"{name}_epoch_{done:03d}.png", "samples")

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def sample_grid_callback(
    context: Any, every: int, sample: Callable[[], SampleSet], value_range: Sequence[float]
) -> Any:
    """The sample-grid callback of the generative models: every ``every`` epochs it
    draws ``sample()`` and logs it as ``samples/samples_epoch_NNN.png``, titled
    ``epoch N``. ``sample`` should draw from fixed noise, so grids compare over epochs."""
    value_range = tuple(value_range)
    return epoch_figure_callback(
        context, every, lambda done: sample_grid_figure(sample(), value_range, f"epoch {done}")
    )


# --------------------------------------------------------------------------------------
# Reading a DataBundle
# --------------------------------------------------------------------------------------


def value_range_of(data: Any) -> tuple[float, float]:
    """``data.value_range`` as floats; ``(0, 1)`` when the data does not say."""
    low, high = getattr(data, "value_range", (0.0, 1.0))
    return float(low), float(high)


def first_split(data: Any) -> str:
    """The first non-empty split of ``data`` among test, val, train."""
    for split in ("test", "val", "train"):
        if data.size(split) > 0:
            return split
    raise ConfigError("the data has no non-empty split")


def labels_of(data: Any, split: str) -> np.ndarray | None:
    """Integer labels of ``split`` (one-hot decoded), or ``None``."""
    y = data.y.get(split)
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        y = y.argmax(axis=-1)
    return y.reshape(len(y))
