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

from dlpipe.errors import DlpipeError, TrainingDiverged
from dlpipe.losses import balanced_class_weights, class_weight_list, make_loss
from dlpipe.models.common import set_term_weights

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


class NanGuard(keras.callbacks.Callback):
    """Stop when any logged loss (``loss``, ``d_loss``, ``val_kl_loss``...) is not finite.

    ``keras.callbacks.TerminateOnNaN`` only watches ``loss``; models with several
    losses report others. Checked once per epoch, off the per-batch hot path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bad: tuple[int, str, float] | None = None

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        for key, value in (logs or {}).items():
            if "loss" in key and np.ndim(value) == 0 and not math.isfinite(float(value)):
                self.bad = (epoch, key, float(value))
                self.model.stop_training = True
                return


class ThrottledBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that writes at most every ``every_seconds`` (plus on demand).

    A re-run of the same spec resumes from the last backup. Saving costs ~20 ms for a
    small model, a large share of a short epoch, so backups are paced by wall time.
    """

    def __init__(self, backup_dir: str, every_seconds: float) -> None:
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=True)
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        if time.monotonic() - self._last_save >= self.every_seconds:
            self.save_now()

    def save_now(self) -> None:
        if self.model is not None and self.model.built:
            self._save_model()
            self._last_save = time.monotonic()


class BestWeights(keras.callbacks.Callback):
    """Keep the best weights seen (by ``monitor``) and write them at most every
    ``every_seconds``, at the end of training, and on :meth:`flush`."""

    def __init__(self, path: Any, monitor: str, mode: str, every_seconds: float) -> None:
        super().__init__()
        self.path = path
        self.monitor = monitor
        self.better = np.less if mode == "min" else np.greater
        self.every_seconds = every_seconds
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self._weights: list[Any] | None = None
        self._dirty = False
        self._last_save = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        if self.best_value is None or self.better(float(value), self.best_value):
            self.best_value, self.best_epoch = float(value), epoch
            self._weights = self.model.get_weights()
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_save >= self.every_seconds:
            self.flush()

    def on_train_end(self, logs: Any = None) -> None:
        self.flush()

    def flush(self) -> None:
        if not self._dirty or self._weights is None:
            return
        current = self.model.get_weights()
        self.model.set_weights(self._weights)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.model.save_weights(str(self.path))
        self.model.set_weights(current)
        self._dirty = False
        self._last_save = time.monotonic()


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
    """Load the best checkpoint into ``model`` and report which epoch it came from."""
    if best is None or best.best_epoch is None or not best.path.is_file():
        print("train: restore_best: no checkpoint was written (the monitored value was "
              "never finite); keeping the last weights")
        return
    model.load_weights(str(best.path))
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

    own_loss = bool(getattr(model, "term_weights", None))
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
        set_term_weights(model, params.loss_weights)

    run_dir = ctx.run_dir
    history: dict[str, list[float]] = {}
    guard = NanGuard()
    every = params.checkpoint.every_seconds
    prefix = stage_prefix(ctx)
    tag = prefix.rstrip("/")
    backup_dir = run_dir / ("backup" if not tag else f"backup-{tag}")
    backup = ThrottledBackup(str(backup_dir), every) if params.resume else None
    best = None
    # The backup records an epoch before anything that may raise in on_epoch_end.
    callbacks: list[Any] = [backup] if backup else []
    callbacks.append(ReportEpochs(ctx, history, prefix))
    if params.nan_guard:
        callbacks.append(guard)
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
    if params.early_stopping is not None:
        es = params.early_stopping
        monitor = es.monitor if (has_val or not es.monitor.startswith("val_")) else es.monitor[4:]
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                mode=es.mode,
                patience=es.patience,
                min_delta=es.min_delta,
                restore_best_weights=es.restore_best_weights,
            )
        )

    factory = entry.callback_factory() if entry else None
    if factory is not None:
        callbacks.extend(factory(ctx, model, data) or [])

    verbose = params.verbose
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    train_ds = data.dataset(
        "train", params.batch_size, shuffle=params.shuffle, seed=ctx.seed, augment=True
    )
    val_ds = data.dataset("val", params.batch_size) if has_val else None
    # TensorFlow and Keras leave ~500k long-lived objects; move them out of the cyclic
    # collector's sight so full collections during training (and at exit) stay cheap.
    gc.collect()
    gc.freeze()
    try:
        # --smoke: one epoch of a few batches exercises every callback and the save.
        smoke = {"steps_per_epoch": min(3, steps_per_epoch),
                 "validation_steps": 2 if val_ds is not None else None} if ctx.smoke else {}
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=1 if ctx.smoke else params.epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # tf.data already shuffles (seeded) before batching
            **smoke,
        )
    except BaseException:
        # Keep what training reached: the best weights, and the resume point.
        if best is not None:
            best.flush()
        if backup is not None and guard.bad is None:
            backup.save_now()
        raise
    ctx.history = history
    if guard.bad is not None:
        epoch, key, value = guard.bad
        raise TrainingDiverged(
            f"stage {ctx.stage.id!r}: {key} became {value} in epoch {epoch + 1}; training "
            f"stopped. Checkpoints so far are kept in {run_dir / 'checkpoints'}. "
            "Try a lower learning rate or gradient clipping (optimizer.clipnorm)."
        )
    if params.restore_best:
        restore_best_weights(ctx, model, best)
    if not params.save_model:
        return
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    # With several train stages, the last one's model is model/model.keras.
    last = [s for s in ctx.spec.stages if s.kind == ctx.stage.kind][-1]
    path = model_dir / ("model.keras" if last.id == ctx.stage.id else f"{tag}.keras")
    model.save(path)
    ctx.log_artifact(path, "model")
