"""Preprocessing: what the data stage did to the raw inputs (resizing, normalization),
recorded with the model and applied again to raw inputs."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError


@dataclass
class Preprocessing:
    """The data stage's resizing and normalization, to apply to raw inputs.

    ``method`` is ``none``, ``minmax``, ``standard`` (the data stages' ``normalize``)
    or ``unknown`` (it could not be recovered: inputs must then be given as the model
    saw them). ``low``/``high`` (minmax) and ``mean``/``std`` (standard) are the
    training split's statistics: one number for images, one per column for tables.
    ``image_size`` is ``[height, width]`` when the data stage resized images.
    """

    method: str = "none"
    target: tuple[float, float] = (0.0, 1.0)
    low: Any = None
    high: Any = None
    mean: Any = None
    std: Any = None
    image_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return np.asarray(v).tolist() if v is not None else None

        return {
            "method": self.method,
            "target": list(self.target),
            "low": plain(self.low),
            "high": plain(self.high),
            "mean": plain(self.mean),
            "std": plain(self.std),
            "image_size": list(self.image_size) if self.image_size else None,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> Preprocessing:
        if not doc:
            return cls()

        def array(v: Any) -> Any:
            return None if v is None else np.asarray(v, dtype=np.float32)

        size = doc.get("image_size")
        low, high = doc.get("target") or (0.0, 1.0)
        return cls(
            method=str(doc.get("method", "none")),
            target=(float(low), float(high)),
            low=array(doc.get("low")),
            high=array(doc.get("high")),
            mean=array(doc.get("mean")),
            std=array(doc.get("std")),
            image_size=(int(size[0]), int(size[1])) if size else None,
        )

    # The formulas of dlpipe.data.normalize, and their inverses.
    def _minmax_scale(self) -> Any:
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return (self.target[1] - self.target[0]) / span

    def _std(self) -> Any:
        return np.where(self.std > 0, self.std, 1.0)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.method == "minmax":
            out = (x - self.low) * self._minmax_scale() + self.target[0]
        elif self.method == "standard":
            out = (x - self.mean) / self._std()
        else:
            out = x
        return np.asarray(out, dtype=np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Model-scale values (reconstructions, samples) back in the raw units."""
        if self.method == "minmax":
            out = (x - self.target[0]) / self._minmax_scale() + self.low
        elif self.method == "standard":
            out = x * self._std() + self.mean
        else:
            out = x
        return np.asarray(out, dtype=np.float32)

    def resize(self, x: np.ndarray) -> np.ndarray:
        """Images resized to ``image_size`` as the data stage did (bilinear, antialiased)."""
        if self.image_size is None or x.ndim != 4 or tuple(x.shape[1:3]) == self.image_size:
            return x
        from dlpipe.data import resize_images

        return resize_images(x, self.image_size)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return self.normalize(self.resize(np.asarray(raw, dtype=np.float32)))


def _data_stage(ctx: Any) -> Any:
    """The data stage whose bundle the model was trained on."""
    stages = list(ctx.spec.stages)
    if ctx.stage is not None:
        stages = stages[: ctx.stage.index]
    return next((s for s in reversed(stages) if s.kind == "data"), None)


def preprocessing_of(ctx: Any, data: Any) -> Preprocessing:
    """What the run's data stage did to its raw inputs.

    A bundle that records it (``data.preprocessing``, a :meth:`Preprocessing.to_dict`
    dict) says so. Otherwise it is recovered from the data stage's params: the stage
    runs again with ``normalize: none`` to get the raw training split, whose
    statistics are what the normalization used; the result is checked against the
    bundle the model was trained on.
    """
    recorded = getattr(data, "preprocessing", None)
    if isinstance(recorded, Mapping):
        return Preprocessing.from_dict(recorded)
    stage = _data_stage(ctx) if ctx is not None else None
    params = getattr(stage, "params", None)
    method = getattr(params, "normalize", None)
    if stage is None or method is None:
        return Preprocessing()  # no normalization option: the inputs are the raw data
    size = getattr(params, "image_size", None)
    target = tuple(float(v) for v in getattr(params, "value_range", (0.0, 1.0)))
    image_size = (int(size[0]), int(size[1])) if size else None
    if method == "none":
        return Preprocessing("none", target, image_size=image_size)  # type: ignore[arg-type]
    try:
        raw = _rerun_without_normalization(ctx, stage)
        prep = _fit(method, target, raw.x["train"], image_size)  # type: ignore[arg-type]
        _check_recovered(prep, raw, data)
    except Exception as exc:  # the model still logs; predict then takes model-scale inputs
        print(f"packaging: could not recover the data stage's normalization ({exc}); the "
              "logged model takes inputs already normalized", flush=True)
        return Preprocessing("unknown", target, image_size=image_size)  # type: ignore[arg-type]
    return prep


def _rerun_without_normalization(ctx: Any, stage: Any) -> Any:
    entry = ctx.plugins.registry.lookup_stage("data", stage.use)
    with tempfile.TemporaryDirectory(prefix="dlpipe-raw-") as folder:
        stub = SimpleNamespace(
            spec=ctx.spec, plugins=ctx.plugins, run_dir=Path(folder), stage=stage,
            seed=ctx.seed, smoke=getattr(ctx, "smoke", False), data=None, model=None,
            models={}, extras={}, tags={}, metrics={}, strategy=getattr(ctx, "strategy", None),
            log_artifact=lambda *a, **k: None, log_metrics=lambda *a, **k: None,
            log_figure=lambda *a, **k: None, hook=SimpleNamespace(),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            entry.function()(stub, stage.params.model_copy(update={"normalize": "none"}))
    if stub.data is None:
        raise DlpipeError(f"data stage {stage.use!r} set no data")
    return stub.data


def _fit(method: str, target: tuple[float, float], train: np.ndarray,
         image_size: tuple[int, int] | None) -> Preprocessing:
    train = np.asarray(train, dtype=np.float32)
    axis = None if train.ndim == 4 else 0
    prep = Preprocessing(method, target, image_size=image_size)
    if method == "minmax":
        prep.low, prep.high = np.min(train, axis=axis), np.max(train, axis=axis)
    elif method == "standard":
        prep.mean, prep.std = np.mean(train, axis=axis), np.std(train, axis=axis)
    else:
        raise DlpipeError(f"unknown normalization {method!r}")
    return prep


def _check_recovered(prep: Preprocessing, raw: Any, data: Any) -> None:
    """The recovered normalization maps the raw data onto what the model trained on."""
    for split in ("test", "train"):
        n = min(64, len(raw.x.get(split, ())), len(data.x.get(split, ())))
        if n:
            got = prep.normalize(np.asarray(raw.x[split][:n], dtype=np.float32))
            want = np.asarray(data.x[split][:n], dtype=np.float32)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise DlpipeError(f"re-running the data stage gave other {split} data")
            return
    raise DlpipeError("the data has no examples to check against")
