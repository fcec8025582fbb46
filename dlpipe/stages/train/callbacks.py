"""The callbacks ``keras_fit`` gives ``fit``: per-epoch metrics, the loss guard, the
best weights, early stopping, resume snapshots and the model's own callbacks.

:func:`build_callbacks` decides their order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import keras
import numpy as np

from dlpipe.checkpoint import BackupFolder, atomic_write, read_weights_npz, write_weights_npz
from dlpipe.stages.train.compile import Loss, output_width
from dlpipe.stages.train.resume import Resumable, Resume, ResumeCheckpoint


def current_learning_rate(optimizer: Any) -> float:
    lr = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr))


class ReportEpochs(keras.callbacks.Callback):
    """Send each epoch's logs (plus learning rate and epoch time) to ``on_metrics``."""

    def __init__(
        self, ctx: Any, initial_epoch_history: dict[str, list[float]], prefix: str = ""
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.history = initial_epoch_history
        self.prefix = prefix
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        metrics["epoch_time_s"] = time.perf_counter() - self._t0
        try:
            metrics["learning_rate"] = current_learning_rate(self.model.optimizer)
        except Exception:  # noqa: BLE001 - some optimizers hide their rate
            pass
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        if self.prefix:
            metrics = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        self.ctx.log_metrics(metrics, step=epoch)


class LossGuard(keras.callbacks.Callback):
    """Stop when a logged loss is not finite, or when training diverges.

    * **NaN/inf:** any logged loss (``loss``, ``d_loss``, ``val_kl_loss``...); Keras'
      ``TerminateOnNaN`` only watches ``loss``, and models with several losses report
      others.
    * **Divergence** (``divergence``): ``loss`` above ``factor`` times a reference
      (the chance-level cross-entropy ``log(classes)`` for a classifier trained with
      cross-entropy, else the first epoch's loss), or above ``max_loss``. An exploding
      learning rate drives a classifier's loss to 1e7 or 1e19 without ever reaching
      NaN; without this guard such a run ends FINISHED at chance accuracy.

    Checked once per epoch, off the per-batch hot path.
    """

    def __init__(self, nan: bool, divergence: Any, chance_loss: float | None) -> None:
        super().__init__()
        self.nan = nan
        self.divergence = divergence if divergence is not None and divergence.enabled else None
        self.reference = chance_loss
        self.bad: tuple[int, str, float, str] | None = None

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs or {}
        if self.nan:
            for key, value in logs.items():
                if "loss" in key and np.ndim(value) == 0 and not math.isfinite(float(value)):
                    self._stop(epoch, key, float(value), "")
                    return
        rule = self.divergence
        value = logs.get("loss")
        if rule is None or value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if self.reference is None:
            self.reference = abs(value) or 1.0  # the first epoch's loss
            return
        limit = rule.factor * self.reference
        if value > limit:
            why = (f"more than {rule.factor:g} x the reference {self.reference:.4g}; "
                   "the training diverged")
            self._stop(epoch, "loss", value, why)
        elif rule.max_loss is not None and value > rule.max_loss:
            self._stop(epoch, "loss", value, f"above divergence.max_loss={rule.max_loss:g}")

    def _stop(self, epoch: int, key: str, value: float, why: str) -> None:
        self.bad = (epoch, key, value, why)
        self.model.stop_training = True


def chance_loss(task: str, loss: Any, num_classes: int | None, own_loss: bool) -> float | None:
    """``log(classes)``: the cross-entropy of a classifier that guesses uniformly."""
    name = getattr(loss, "name", loss) if loss is not None else None
    if own_loss or task != "classification" or not num_classes or num_classes < 2:
        return None
    if not isinstance(name, str) or "crossentropy" not in name or "focal" in name:
        return None
    return math.log(num_classes)


class BestTracker(keras.callbacks.Callback, Resumable):
    """The best value of ``monitor`` so far, the epoch it was reached, and (when
    ``keep_weights``) a copy of the weights at that epoch, in memory."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0,
                 keep_weights: bool = True) -> None:
        super().__init__()
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(min_delta)
        self.keep_weights = keep_weights
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: list[Any] | None = None

    def improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def track(self, epoch: int, logs: Any) -> bool | None:
        """Record ``epoch``; ``True`` if it is the new best, ``None`` if unmonitored."""
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return None
        if not self.improved(float(value)):
            return False
        self.best_value, self.best_epoch = float(value), epoch
        if self.keep_weights:
            self.best_weights = self.model.get_weights()
        return True

    def resume_state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def write_resume_files(self, folder: Any) -> None:
        if self.best_weights is not None:
            write_weights_npz(folder / f"{self.resume_name}.npz", self.best_weights)

    def restore(self, state: dict[str, Any], folder: Any) -> None:
        self.best_value = state.get("best_value")
        self.best_epoch = state.get("best_epoch")
        path = folder / f"{self.resume_name}.npz"
        if self.keep_weights and path.is_file():
            self.best_weights = read_weights_npz(path)


class EarlyStop(BestTracker):
    """Early stopping with state that survives a resume (Keras' ``EarlyStopping``
    resets itself in ``on_train_begin``). Stops after ``patience`` epochs without an
    improvement of at least ``min_delta`` and, with ``restore_best_weights``, puts the
    best epoch's weights back when it stops."""

    resume_name = "early_stopping"

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float,
                 restore_best_weights: bool) -> None:
        super().__init__(monitor, mode, min_delta, keep_weights=restore_best_weights)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        better = self.track(epoch, logs)
        if better is None:
            return
        self.wait = 0 if better else self.wait + 1
        if self.wait >= self.patience and epoch > 0 and not better:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
            print(f"train: early stopping in epoch {epoch + 1}: no better {self.monitor} "
                  f"for {self.patience} epochs (best {self.best_value:.4g} in epoch "
                  f"{(self.best_epoch or 0) + 1})")

    def resume_state(self) -> dict[str, Any]:
        return {**super().resume_state(), "wait": self.wait}

    def restore(self, state: dict[str, Any], folder: Any) -> None:
        super().restore(state, folder)
        self.wait = int(state.get("wait") or 0)


class BestWeights(BestTracker):
    """Keep the best weights seen (by ``monitor``) and write them to ``path`` at most
    every ``every_seconds``, at the end of training, and on :meth:`flush`. Writes are
    atomic, so the file on disk is always a whole earlier best."""

    resume_name = "best"

    def __init__(self, path: Any, monitor: str, mode: str, every_seconds: float) -> None:
        super().__init__(monitor, mode)
        self.path = path
        self.every_seconds = every_seconds
        self._dirty = False
        self._last_save = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.track(epoch, logs):
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_save >= self.every_seconds:
            self.flush()

    def on_train_end(self, logs: Any = None) -> None:
        self.flush()

    def restore(self, state: dict[str, Any], folder: Any) -> None:
        super().restore(state, folder)
        self._dirty = self.best_weights is not None and not self.path.is_file()

    def flush(self) -> None:
        if not self._dirty or self.best_weights is None:
            return
        current = self.model.get_weights()
        self.model.set_weights(self.best_weights)
        try:
            atomic_write(self.path, lambda tmp: self.model.save_weights(str(tmp)))
        finally:
            self.model.set_weights(current)
        self._dirty = False
        self._last_save = time.monotonic()


def restore_best_weights(ctx: Any, model: Any, best: BestWeights | None) -> None:
    """Put the best weights into ``model`` and report which epoch they came from."""
    if best is None or best.best_epoch is None or best.best_weights is None:
        print("train: restore_best: no checkpoint was written (the monitored value was "
              "never finite); keeping the last weights")
        return
    model.set_weights(best.best_weights)
    assert best.best_value is not None
    print(f"train: restored the best weights, epoch {best.best_epoch + 1} "
          f"({best.monitor}={best.best_value:.4g})")
    ctx.log_metrics({"best_epoch": best.best_epoch + 1, f"best_{best.monitor}": best.best_value})


def guard_message(ctx: Any, guard: LossGuard, backup: BackupFolder) -> str:
    """Why training stopped, where its checkpoints are, and what to try."""
    assert guard.bad is not None
    epoch, key, value, why = guard.bad
    kept = [p for p in (ctx.run_dir / "checkpoints", backup.folder) if p.exists()]
    where = f" Checkpoints so far are kept in {' and '.join(map(str, kept))}." if kept else ""
    what = f"{key} became {value:.4g}" + (f" ({why})" if why else "")
    return (
        f"stage {ctx.stage.id!r}: {what} in epoch {epoch + 1}; training stopped.{where} "
        "Try a lower learning rate or gradient clipping (optimizer.clipnorm)."
    )


@dataclasses.dataclass
class Callbacks:
    """What ``fit`` gets (:attr:`all`, in order) and what the stage reads back after it:
    the epochs' ``history``, the ``guard``, the ``best`` weights (``None`` without
    ``checkpoint``), the :class:`~.resume.Resumable` ones and the resume ``checkpoint``
    (made even when resuming is off: its epoch is where training starts)."""

    all: list[Any]
    history: dict[str, list[float]]
    guard: LossGuard
    best: BestWeights | None
    resumables: list[Any]
    checkpoint: ResumeCheckpoint


def build_callbacks(ctx: Any, params: Any, model: Any, data: Any, task: str, loss: Loss,
                    resume: Resume, prefix: str) -> Callbacks:
    """The stage's callbacks in the order they run at the end of an epoch, then the
    model's own (its registry entry's callback factory), last.

    ``prefix`` (:func:`~.fit.stage_prefix`) goes before the metric names and into the
    best-weights file name."""
    tag = prefix.rstrip("/")
    has_val = data.size("val") > 0
    every = params.checkpoint.every_seconds
    history: dict[str, list[float]] = {}
    guard = LossGuard(
        params.nan_guard, params.divergence,
        chance_loss(task, loss.loss, output_width(model, data), loss.own),
    )
    best = None
    resumables: list[Any] = []
    callbacks: list[Any] = [ReportEpochs(ctx, history, prefix), guard]
    if params.checkpoint.enabled:
        monitor = params.checkpoint.monitor
        if not has_val and monitor.startswith("val_"):
            monitor = monitor[4:]
        best = BestWeights(
            ctx.run_dir / "checkpoints" / (f"{tag}.best.weights.h5" if tag else "best.weights.h5"),
            monitor,
            params.checkpoint.mode,
            every,
        )
        callbacks.append(best)
        resumables.append(best)
    if params.early_stopping is not None:
        es = params.early_stopping
        stopper = EarlyStop(
            es.monitor if (has_val or not es.monitor.startswith("val_")) else es.monitor[4:],
            es.mode, es.patience, es.min_delta, es.restore_best_weights,
        )
        callbacks.append(stopper)
        resumables.append(stopper)
    # The checkpoint comes after the epoch is in the history, has passed the loss
    # guard (a diverged epoch is never saved) and every resumable callback has seen
    # it, so the snapshot holds the epoch's state in full.
    checkpoint = ResumeCheckpoint(
        resume.backup, every, params.epochs, history, resumables, resume.snapshot, guard
    )
    if resume.enabled:
        callbacks.append(checkpoint)

    entry = ctx.model_entry()
    factory = entry.callback_factory() if entry else None
    if factory is not None:
        callbacks.extend(factory(ctx, model, data) or [])
    return Callbacks(callbacks, history, guard, best, resumables, checkpoint)
