"""The training stage: ``model.fit`` driven by the spec.

Per-epoch metrics go to the ``on_metrics`` hook (MLflow logs them); nothing runs per
batch except Keras itself.

Before ``fit`` the stage applies what the spec asks of the model and the data (each
option is described in ``docs/training.md``):

* ``loss``: a Keras name, or a structured loss (:func:`dlpipe.losses.make_loss`);
* ``regularization``: L1/L2 penalties on the kernels of layer groups
  (:func:`apply_regularization`);
* ``oversample`` and ``class_weight``: a rebalanced training split and per-example
  weights (:func:`balanced_training_data`), combined with the data's own weights.

After ``fit``, ``restore_best`` loads the best checkpoint before the model is saved.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import math
import sys
import time
from typing import Any

import keras
import numpy as np

from dlpipe.checkpoint import (
    BackupFolder,
    Snapshot,
    atomic_write,
    read_model_state,
    read_weights_npz,
    write_model_state,
    write_weights_npz,
)
from dlpipe.errors import DlpipeError, TrainingDiverged
from dlpipe.losses import balanced_class_weights, class_weight_list, make_loss
from dlpipe.models.common import set_loss_weights

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "nadam": keras.optimizers.Nadam,
}


@keras.saving.register_keras_serializable(package="dlpipe")
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to the peak rate, then hand over to another schedule."""

    def __init__(self, peak: float, warmup_steps: int, after: Any) -> None:
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.after = after

    def __call__(self, step: Any) -> Any:
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / float(max(self.warmup_steps, 1))
        rest = self.after(step - self.warmup_steps) if callable(self.after) else self.after
        return keras.ops.where(step < self.warmup_steps, warm, rest)

    def get_config(self) -> dict[str, Any]:
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "after": after}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WarmUp:
        after = config["after"]
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        return cls(config["peak"], config["warmup_steps"], after)


def learning_rate(opt: Any, steps_per_epoch: int, epochs: int) -> Any:
    """A float or a ``LearningRateSchedule`` from ``optimizer.schedule``."""
    lr = opt.learning_rate
    sched = opt.schedule
    if sched is None or (sched.name == "constant" and not sched.warmup_epochs):
        return lr
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    total = max(epochs * steps_per_epoch - warmup, 1)
    period = max(int(round(sched.decay_epochs * steps_per_epoch)), 1)
    schedules = keras.optimizers.schedules
    after: Any
    if sched.name == "cosine":
        after = schedules.CosineDecay(lr, decay_steps=total, alpha=sched.alpha)
    elif sched.name == "exponential":
        after = schedules.ExponentialDecay(lr, period, sched.decay_rate)
    elif sched.name == "step":
        after = schedules.ExponentialDecay(lr, period, sched.decay_rate, staircase=True)
    else:
        after = lr
    return WarmUp(lr, warmup, after) if warmup else after


def make_optimizer(opt: Any, steps_per_epoch: int, epochs: int) -> Any:
    kwargs: dict[str, Any] = {"learning_rate": learning_rate(opt, steps_per_epoch, epochs)}
    for key in ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay"):
        value = getattr(opt, key)
        if value is not None:
            kwargs[key] = value
    if opt.name in ("sgd", "rmsprop") and opt.momentum is not None:
        kwargs["momentum"] = opt.momentum
    if opt.name == "sgd":
        kwargs["nesterov"] = opt.nesterov
    for key in ("beta_1", "beta_2", "epsilon"):  # validated: only where the optimizer has them
        value = getattr(opt, key, None)
        if value is not None:
            kwargs[key] = value
    return _OPTIMIZERS[opt.name](**kwargs)


# ------------------------------------------------------------------- regularization

#: Weight attributes a penalty applies to, and the layer option that records it in
#: the layer's config (so a saved model reloads with the same penalty).
_PENALIZED = (
    ("kernel", ("kernel_regularizer", "depthwise_regularizer")),
    ("depthwise_kernel", ("depthwise_regularizer",)),
    ("pointwise_kernel", ("pointwise_regularizer",)),
    ("embeddings", ("embeddings_regularizer",)),
)


def all_layers(model: Any) -> list[Any]:
    """Every layer inside ``model``, nested models' layers included, in order."""
    found: list[Any] = []
    for layer in getattr(model, "layers", None) or []:
        found.append(layer)
        found.extend(all_layers(layer))
    return found


def _kernels(layer: Any) -> list[Any]:
    out = []
    for attr, _ in _PENALIZED:
        try:
            var = getattr(layer, attr, None)
        except Exception:  # noqa: BLE001 - a property of an unbuilt or quantized layer
            var = None
        if isinstance(var, keras.Variable) and var.trainable:
            out.append(var)
    return out


def apply_regularization(model: Any, rules: list[Any]) -> dict[str, Any]:
    """Attach ``L1L2`` penalties to the kernels of the layers each rule's glob matches.

    A glob matches a layer's name or its class name, ignoring case (``conv*`` finds
    ``Conv2D`` layers and layers named ``conv3``); the last rule matching a layer wins.
    The model is already built, so a layer's ``kernel_regularizer`` option alone would
    do nothing: Keras collects penalties from ``variable.regularizer`` of the trainable
    weights (``Layer.losses``), so the regularizer is set on the kernel variable. The
    layer option is set too, so the saved model's config carries the penalty. Keras'
    built-in ``train_step`` adds ``model.losses`` to the loss; models with their own
    ``train_step`` must add them themselves. Returns ``{layer name: regularizer}``.
    """
    chosen: dict[int, tuple[Any, Any]] = {}
    candidates = [layer for layer in all_layers(model) if _kernels(layer)]
    for rule in rules:
        pattern = rule.layers.lower()
        matched = [
            layer for layer in candidates
            if fnmatch.fnmatchcase(layer.name.lower(), pattern)
            or fnmatch.fnmatchcase(type(layer).__name__.lower(), pattern)
        ]
        if not matched:
            names = ", ".join(f"{la.name} ({type(la).__name__})" for la in candidates) or "none"
            raise DlpipeError(
                f"regularization: layers {rule.layers!r} matches no layer with weights; "
                f"layers with kernels: {names}"
            )
        regularizer = keras.regularizers.L1L2(l1=rule.l1, l2=rule.l2) if (rule.l1 or rule.l2) else None
        for layer in matched:
            chosen[id(layer)] = (layer, regularizer)
    applied: dict[str, Any] = {}
    for layer, regularizer in chosen.values():
        for var in _kernels(layer):
            var.regularizer = regularizer
        for _, options in _PENALIZED:
            for option in options:
                if hasattr(layer, option):
                    setattr(layer, option, regularizer)
        if regularizer is not None:
            applied[layer.name] = regularizer
    return applied


# -------------------------------------------------------------------- class balance


def _class_labels(data: Any, what: str) -> np.ndarray:
    y = data.y.get("train")
    if data.task != "classification" or y is None or np.ndim(y) != 1 or not data.num_classes:
        raise DlpipeError(
            f"{what} needs a classification data stage with one integer label per example"
        )
    return np.asarray(y).astype(np.int64)


def oversample_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices that repeat examples of the smaller classes (drawn with replacement, from
    a seeded generator) until every class present has as many as the largest one. All
    original examples are kept; the result is shuffled."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(counts.max())
    parts = []
    for cls, count in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == cls)
        extra = rng.choice(members, size=target - int(count), replace=True)
        parts.extend([members, extra])
    return rng.permutation(np.concatenate(parts))


def balanced_training_data(data: Any, params: Any, seed: int) -> Any:
    """The bundle with its training split oversampled and/or class-weighted.

    Class weights become per-example weights (what ``fit(class_weight=...)`` does
    inside Keras), multiplied with the data's own sample weights; 'balanced' is
    computed from the labels the model trains on (after oversampling).
    """
    if not params.oversample and params.class_weight is None:
        return data
    what = "oversample" if params.oversample else "class_weight"
    labels = _class_labels(data, what)
    x, y = data.x["train"], data.y["train"]
    w = data.weights.get("train")
    if params.oversample:
        index = oversample_indices(labels, seed)
        x, y, labels = x[index], y[index], labels[index]
        w = None if w is None else w[index]
        counts = np.bincount(labels, minlength=data.num_classes)
        print(f"train: oversampled the training split to {len(index)} examples "
              f"({', '.join(str(int(c)) for c in counts)} per class)")
    if params.class_weight is not None:
        if params.class_weight == "balanced":
            per_class = balanced_class_weights(labels, data.num_classes)
        else:
            try:
                per_class = class_weight_list(params.class_weight, data.num_classes, data.class_names)
            except ValueError as exc:
                raise DlpipeError(f"class_weight: {exc}") from exc
        print("train: class weights " + ", ".join(f"{c}={v:.3g}" for c, v in enumerate(per_class)))
        by_class = np.asarray(per_class, dtype=np.float32)[labels]
        w = by_class if w is None else np.asarray(w, dtype=np.float32) * by_class
    return dataclasses.replace(
        data,
        x={**data.x, "train": x},
        y={**data.y, "train": y},
        weights={**data.weights, "train": w},
    )


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


def stage_prefix(ctx: Any) -> str:
    """``"<stage id>/"`` when the spec has several train stages, else ``""``.

    Two train stages in one run (an autoencoder, then latent diffusion on it) would
    otherwise log the same metric names and files into one MLflow run: their epoch
    metrics become ``train_vae/loss``, ``train_diffusion/loss`` (grouped in the
    MLflow UI), and checkpoints and saved models get the stage id in their names.
    """
    trains = [s for s in ctx.spec.stages if s.kind == ctx.stage.kind]
    return f"{ctx.stage.id}/" if len(trains) > 1 else ""


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


class Resumable:
    """A callback whose state a resume snapshot keeps (see :class:`ResumeCheckpoint`).

    ``resume_state`` returns JSON data; ``write_resume_files(folder)`` may add files
    (named after :attr:`resume_name`); ``restore(state, folder)`` puts both back,
    before training resumes. Restored callbacks must not reset in ``on_train_begin``.
    """

    resume_name = "callback"

    def resume_state(self) -> dict[str, Any]:
        return {}

    def write_resume_files(self, folder: Any) -> None:
        pass

    def restore(self, state: dict[str, Any], folder: Any) -> None:
        pass


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


class ResumeCheckpoint(keras.callbacks.Callback):
    """Write resume snapshots (:mod:`dlpipe.checkpoint`) at most every
    ``every_seconds`` at the end of an epoch, and restore one in ``on_train_begin``.

    A snapshot holds everything ``fit`` had at the end of an epoch: the weights and the
    optimizers' state (its iteration count drives learning-rate schedules), the random
    generators, the epoch, the history so far and the state of every
    :class:`Resumable` callback (best-so-far, best weights, early-stopping patience).
    It comes after those callbacks in the list, so it saves what they made of the
    epoch; they do not reset in ``on_train_begin``, so restoring there is in time.
    """

    def __init__(self, backup: BackupFolder, every_seconds: float, epochs: int,
                 history: dict[str, list[float]], resumables: list[Any],
                 snapshot: Snapshot | None, guard: LossGuard | None = None) -> None:
        super().__init__()
        self.guard = guard
        self.backup = backup
        self.every_seconds = every_seconds
        self.epochs = epochs
        self.history = history
        self.resumables = resumables
        self.snapshot = snapshot
        self.epoch = snapshot.epoch if snapshot else 0
        self.saved_epoch = self.epoch
        self._last_save = time.monotonic()

    def on_train_begin(self, logs: Any = None) -> None:
        if self.snapshot is not None:
            restore_snapshot(self.model, self.snapshot, self.resumables, self.history)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.guard is not None and self.guard.bad is not None:
            return  # never save weights that diverged
        self.epoch = epoch + 1
        if self.model.stop_training:
            # Early stopping may have put the best weights back; training ends here
            # and the final snapshot follows. A kill before it replays this epoch.
            return
        if time.monotonic() - self._last_save >= self.every_seconds:
            self.save()

    def save(self, done: bool = False) -> None:
        state = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "done": done,
            "history": self.history,
            "callbacks": {cb.resume_name: cb.resume_state() for cb in self.resumables},
        }

        def write(folder: Any) -> None:
            write_model_state(self.model, folder)
            for cb in self.resumables:
                cb.write_resume_files(folder)

        self.backup.save(state, write)
        self.saved_epoch = self.epoch
        self._last_save = time.monotonic()


def _build_optimizers(model: Any) -> None:
    """Create optimizer variables so ``load_weights`` has somewhere to put them
    (``fit`` builds them itself before ``on_train_begin``)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def restore_snapshot(model: Any, snapshot: Snapshot, resumables: list[Any],
                     history: dict[str, list[float]]) -> None:
    _build_optimizers(model)
    read_model_state(model, snapshot)
    states = snapshot.state.get("callbacks") or {}
    for cb in resumables:
        cb.restore(states.get(cb.resume_name) or {}, snapshot.folder)
    history.clear()
    for key, values in (snapshot.state.get("history") or {}).items():
        history[key] = list(values)[: snapshot.epoch]


def default_loss(task: str) -> tuple[str | None, list[str]]:
    if task == "classification":
        return "sparse_categorical_crossentropy", ["accuracy"]
    if task == "regression":
        return "mse", ["mae"]
    if task == "seq2seq":  # token ids as targets; sequence models add their own metrics
        return "sparse_categorical_crossentropy", []
    if task == "segmentation":  # integer masks (n, h, w) vs per-pixel softmax (n, h, w, k)
        return "sparse_categorical_crossentropy", ["accuracy"]
    return None, []


def _output_width(model: Any, data: Any) -> int | None:
    """Classes the model predicts: its (first) output's last dimension, else the data's."""
    try:
        width = model.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError, ValueError):
        width = None
    return int(width) if width else data.num_classes


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


def keras_fit(ctx: Any, params: Any) -> None:
    model, data = ctx.model, ctx.data
    if model is None or data is None:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: training needs a data stage and a model stage before it"
        )
    entry = ctx.model_entry()
    task = entry.task if entry else data.task
    data = balanced_training_data(data, params, ctx.seed)
    n_train = data.size("train")
    steps_per_epoch = max(math.ceil(n_train / params.batch_size), 1)
    has_val = data.size("val") > 0

    own_loss = bool(getattr(model, "loss_weights", None))
    loss, metrics = (None, []) if own_loss else default_loss(task)
    if params.loss is not None:
        try:
            loss = make_loss(
                params.loss,
                num_classes=_output_width(model, data),
                class_names=data.class_names,
                train_labels=data.y.get("train"),
            )
        except ValueError as exc:
            raise DlpipeError(f"stage {ctx.stage.id!r}: loss: {exc}") from exc
    metrics = params.metrics if params.metrics is not None else metrics
    if task == "segmentation" and params.metrics is None and data.num_classes:
        # Needs num_classes, so a spec cannot name it as a string: added by default.
        metrics = [*metrics, keras.metrics.MeanIoU(
            int(data.num_classes), sparse_y_pred=False, name="miou")]
    if loss is None and not own_loss:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: the model computes no loss of its own and none is set; "
            "add params.loss (for example sparse_categorical_crossentropy or mse)"
        )
    if params.regularization:
        applied = apply_regularization(model, params.regularization)
        if own_loss:
            print("train: note: this model computes its own loss; regularization counts only "
                  "if its train_step adds model.losses")
        print(f"train: regularization on {len(applied)} layer(s): "
              + ", ".join(f"{name} (l1={r.l1:g}, l2={r.l2:g})" for name, r in applied.items()))
    with ctx.strategy.scope():
        optimizer = make_optimizer(params.optimizer, steps_per_epoch, params.epochs)
        model.compile(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics or None,
            jit_compile=params.jit_compile,
            steps_per_execution=params.steps_per_execution,
        )
    if params.loss_weights:
        if not own_loss:
            raise DlpipeError(
                f"stage {ctx.stage.id!r}: loss_weights {sorted(params.loss_weights)} given, but "
                "the model has no named loss terms"
            )
        set_loss_weights(model, params.loss_weights)

    run_dir = ctx.run_dir
    history: dict[str, list[float]] = {}
    every = params.checkpoint.every_seconds
    prefix = stage_prefix(ctx)
    tag = prefix.rstrip("/")
    backup = BackupFolder(run_dir / ("backup" if not tag else f"backup-{tag}"))
    snapshot = None
    if params.resume and not ctx.smoke:
        if ctx.restart:
            aside = backup.set_aside("restarted")
            if aside is not None:
                print(f"train: --restart: the earlier backup is kept aside in {aside}")
        snapshot = backup.load(params.epochs, older=ctx.resume_older)
    guard = LossGuard(
        params.nan_guard, params.divergence,
        chance_loss(task, loss, _output_width(model, data), own_loss),
    )
    best = None
    resumables: list[Any] = []
    callbacks: list[Any] = [ReportEpochs(ctx, history, prefix), guard]
    if params.checkpoint.enabled:
        monitor = params.checkpoint.monitor
        if not has_val and monitor.startswith("val_"):
            monitor = monitor[4:]
        best = BestWeights(
            run_dir / "checkpoints" / (f"{tag}.best.weights.h5" if tag else "best.weights.h5"),
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
        backup, every, params.epochs, history, resumables, snapshot, guard
    )
    if params.resume and not ctx.smoke:
        callbacks.append(checkpoint)

    factory = entry.callback_factory() if entry else None
    if factory is not None:
        callbacks.extend(factory(ctx, model, data) or [])

    if snapshot is not None and snapshot.done:
        # Training finished in an earlier run that was stopped later (in evaluation,
        # say): use its final weights instead of training again.
        with ctx.strategy.scope():  # optimizer variables are made under the strategy
            restore_snapshot(model, snapshot, resumables, history)
        print(f"train: training finished in an earlier run ({snapshot.epoch} epochs; "
              f"{snapshot.folder}); using its weights, not training again")
        if params.restore_best:  # the same weights; logs best_epoch for this run too
            restore_best_weights(ctx, model, best)
    else:
        if snapshot is not None:
            print(f"train: resuming from {snapshot.folder} after epoch {snapshot.epoch} "
                  f"of {params.epochs}")
        _fit(ctx, params, model, data, callbacks, has_val, steps_per_epoch, checkpoint.epoch)
        if guard.bad is not None:
            raise TrainingDiverged(_guard_message(ctx, guard, backup))
        if params.restore_best:
            restore_best_weights(ctx, model, best)
        if params.resume and not ctx.smoke:
            # Training is done: a kill in a later stage must not cost it. The backup is
            # removed once the whole run has finished.
            checkpoint.save(done=True)
    ctx.history = history
    if params.resume and not ctx.smoke:
        ctx.discard_on_success.append(backup.folder)
    if not params.save_model:
        return
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    # With several train stages, the last one's model is model/model.keras.
    last = [s for s in ctx.spec.stages if s.kind == ctx.stage.kind][-1]
    path = model_dir / ("model.keras" if last.id == ctx.stage.id else f"{tag}.keras")
    atomic_write(path, lambda tmp: model.save(tmp))
    ctx.log_artifact(path, "model")


def _guard_message(ctx: Any, guard: LossGuard, backup: BackupFolder) -> str:
    assert guard.bad is not None
    epoch, key, value, why = guard.bad
    kept = [p for p in (ctx.run_dir / "checkpoints", backup.folder) if p.exists()]
    where = f" Checkpoints so far are kept in {' and '.join(map(str, kept))}." if kept else ""
    what = f"{key} became {value:.4g}" + (f" ({why})" if why else "")
    return (
        f"stage {ctx.stage.id!r}: {what} in epoch {epoch + 1}; training stopped.{where} "
        "Try a lower learning rate or gradient clipping (optimizer.clipnorm)."
    )


def _fit(ctx: Any, params: Any, model: Any, data: Any, callbacks: list[Any], has_val: bool,
         steps_per_epoch: int, initial_epoch: int) -> None:
    verbose = params.verbose
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    epochs = 1 if ctx.smoke else params.epochs
    # One pass per epoch in a fixed order per (seed, epoch), so a resumed run sees
    # the same batches as an uninterrupted one.
    train_ds = data.epoch_dataset(
        "train", params.batch_size, first_epoch=initial_epoch, epochs=epochs,
        shuffle=params.shuffle, seed=ctx.seed, augment=True,
    )
    val_ds = data.dataset("val", params.batch_size) if has_val else None
    # TensorFlow and Keras leave ~500k long-lived objects; move them out of the cyclic
    # collector's sight so full collections during training (and at exit) stay cheap.
    gc.collect()
    gc.freeze()
    # --smoke: one epoch of a few batches exercises every callback and the save.
    smoke = {"steps_per_epoch": min(3, steps_per_epoch),
             "validation_steps": 2 if val_ds is not None else None} if ctx.smoke else {}
    model.fit(
        train_ds,
        validation_data=val_ds,
        initial_epoch=initial_epoch,
        epochs=epochs,
        steps_per_epoch=smoke.pop("steps_per_epoch", steps_per_epoch),
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the dataset is already in its per-epoch order
        **smoke,
    )
