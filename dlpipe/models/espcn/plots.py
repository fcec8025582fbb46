"""The figures of ``espcn`` and ``srgan``: rows low-res / bicubic / model / ground
truth, and the per-image PSNR gain over bicubic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.models import grids

if TYPE_CHECKING:  # model.py imports this module for its callback
    from dlpipe.models.espcn.model import SuperResolution


def comparison_rows(model: SuperResolution, hr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Rows low-res / bicubic / model / ground truth for a few high-res images; the
    bicubic and model rows are labelled with their mean PSNR."""
    hr = np.asarray(hr, dtype="float32")
    lr = model.downsample(hr)
    bicubic = model.bicubic(lr)
    sr = ops.clip(model.upscale(lr), *model.value_range)
    bic_psnr, _ = model.quality(bicubic, hr)
    sr_psnr, _ = model.quality(sr, hr)

    def mean_db(values: Any) -> str:
        return f"{float(np.mean(ops.convert_to_numpy(values))):.1f} dB"

    return [
        (f"low-res (1/{model.scale})", ops.convert_to_numpy(lr)),
        (f"bicubic ({mean_db(bic_psnr)})", ops.convert_to_numpy(bicubic)),
        (f"{model.name} ({mean_db(sr_psnr)})", ops.convert_to_numpy(sr)),
        ("ground truth", hr),
    ]


def comparison_figure(model: SuperResolution, hr: np.ndarray, title: str = "") -> Any:
    fig = grids.rows_figure(comparison_rows(model, hr), model.value_range)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def grid_images(data: DataBundle, n: int = 8) -> np.ndarray:
    """The first ``n`` high-res images of the first non-empty split among test/val/train."""
    return np.asarray(data.x[grids.first_split(data)][:n], dtype="float32")


def psnr_gain_figure(
    model: SuperResolution, data: DataBundle, split: str, limit: int = 2000
) -> Any:
    """Histogram of the per-image PSNR gain of the model over bicubic on ``split``."""
    hr = np.asarray(data.x[split][:limit], dtype="float32")
    gains, sr_all, bic_all = [], [], []
    for i in range(0, len(hr), 256):
        batch = hr[i : i + 256]
        lr = model.downsample(batch)
        sr_psnr, _ = model.quality(model.upscale(lr), batch)
        bic_psnr, _ = model.quality(model.bicubic(lr), batch)
        sr_np, bic_np = ops.convert_to_numpy(sr_psnr), ops.convert_to_numpy(bic_psnr)
        gains.append(sr_np - bic_np)
        sr_all.append(sr_np)
        bic_all.append(bic_np)
    gain = np.concatenate(gains)
    fig = grids.figure(6, 4)
    ax = fig.subplots()
    ax.hist(gain, bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="gray", ls="--", lw=1)
    ax.set_xlabel(f"PSNR({model.name}) - PSNR(bicubic) per image [dB]")
    ax.set_ylabel("images")
    ax.set_title(
        f"{split}: {model.name} {np.mean(np.concatenate(sr_all)):.2f} dB vs bicubic "
        f"{np.mean(np.concatenate(bic_all)):.2f} dB; better on {np.mean(gain > 0):.0%}",
        fontsize=9,
    )
    return fig


def plots(context: Any, model: SuperResolution, data: DataBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``superres.png`` (rows low-res, bicubic, model, ground
    truth) and ``psnr_gain.png``. ``context`` is not used."""
    split = grids.first_split(data)
    yield "superres.png", comparison_figure(model, grid_images(data), f"{split} images")
    yield "psnr_gain.png", psnr_gain_figure(model, data, split)
