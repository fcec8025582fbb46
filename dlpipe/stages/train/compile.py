"""Compiling the model for ``keras_fit``: optimizer and learning-rate schedule, loss,
metrics, and the weights of a model's own loss terms (``loss_weights``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras

from dlpipe.errors import DlpipeError
from dlpipe.losses import make_loss
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


def steps_per_epoch(data: Any, params: Any) -> int:
    """Batches in one pass over the training split (at least one)."""
    return max(math.ceil(data.size("train") / params.batch_size), 1)


# ------------------------------------------------------------------- loss and metrics


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


def output_width(model: Any, data: Any) -> int | None:
    """Classes the model predicts: its (first) output's last dimension, else the data's."""
    try:
        width = model.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError, ValueError):
        width = None
    return int(width) if width else data.num_classes


@dataclasses.dataclass(frozen=True)
class Loss:
    """What ``compile`` gets: ``loss`` (``None`` when the model computes its own) and
    ``metrics``. ``own`` says the model has its own named loss terms
    (``model.loss_weights``), whether or not a ``loss`` is set as well."""

    loss: Any
    metrics: list[Any]
    own: bool


def choose_loss(ctx: Any, params: Any, model: Any, data: Any, task: str) -> Loss:
    """The spec's ``loss`` and ``metrics``, else the task's defaults; raises when the
    model would train on no loss at all."""
    own = bool(getattr(model, "loss_weights", None))
    loss, metrics = (None, []) if own else default_loss(task)
    if params.loss is not None:
        try:
            loss = make_loss(
                params.loss,
                num_classes=output_width(model, data),
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
    if loss is None and not own:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: the model computes no loss of its own and none is set; "
            "add params.loss (for example sparse_categorical_crossentropy or mse)"
        )
    return Loss(loss, metrics, own)


# ------------------------------------------------------------------------- compiling


def resolve_jit_compile(ctx: Any, params: Any) -> bool | str:
    """What ``compile`` gets as ``jit_compile``: the spec's ``jit_compile``, except for an
    architecture registered with ``xla=False``. That one trains without XLA under
    ``auto`` (Keras's own ``auto`` turns XLA on with one GPU) and refuses ``true`` with
    an error naming it, rather than failing deep inside the first step."""
    wanted = params.jit_compile
    entry = ctx.model_entry()
    if entry is None or getattr(entry, "xla", True) or wanted is False:
        return wanted
    if wanted is True:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: jit_compile: true, but architecture {entry.name!r} "
            f"(plugin {entry.plugin!r}) is registered with xla=False: its training and "
            "prediction steps do not compile with XLA. Use jit_compile: auto (trains it "
            "without XLA) or false"
        )
    return False


def compile_model(ctx: Any, params: Any, model: Any, loss: Loss, steps_per_epoch: int) -> None:
    """``model.compile`` with the spec's optimizer, under the distribution strategy."""
    jit = resolve_jit_compile(ctx, params)
    with ctx.strategy.scope():
        optimizer = make_optimizer(params.optimizer, steps_per_epoch, params.epochs)
        model.compile(
            optimizer=optimizer,
            loss=loss.loss,
            metrics=loss.metrics or None,
            jit_compile=jit,
            steps_per_execution=params.steps_per_execution,
        )


def apply_loss_weights(ctx: Any, params: Any, model: Any, loss: Loss) -> None:
    """Set the spec's ``loss_weights`` on the model's own loss terms
    (:func:`dlpipe.models.common.set_loss_weights`)."""
    if not params.loss_weights:
        return
    if not loss.own:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: loss_weights {sorted(params.loss_weights)} given, but "
            "the model has no named loss terms"
        )
    set_loss_weights(model, params.loss_weights)
