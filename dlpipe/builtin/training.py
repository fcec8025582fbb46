"""Built-in training stage: ``model.fit`` with the options a spec can set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class ScheduleParams(Params):
    """A learning-rate schedule; decay lengths are counted in epochs."""

    name: Literal["constant", "cosine", "exponential", "step"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up from 0 to the peak rate.")
    decay_rate: float = Field(0.5, gt=0, description="exponential/step: factor per decay period.")
    decay_epochs: float = Field(10.0, gt=0, description="exponential/step: epochs per period.")
    alpha: float = Field(0.0, ge=0, description="cosine: final rate as a fraction of the peak.")


class OptimizerParams(Params):
    name: Literal["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    momentum: float | None = Field(None, ge=0, description="sgd/rmsprop momentum.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum.")
    weight_decay: float | None = Field(None, ge=0, description="Decoupled weight decay.")
    clipnorm: float | None = Field(None, gt=0, description="Clip each gradient's norm.")
    clipvalue: float | None = Field(None, gt=0, description="Clip gradient values.")
    global_clipnorm: float | None = Field(None, gt=0, description="Clip the global norm.")
    schedule: ScheduleParams | None = None


class EarlyStoppingParams(Params):
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = Field("min", description="Explicit: 'auto' fails for custom metrics.")
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best_weights: bool = True


class CheckpointParams(Params):
    """Best weights (``checkpoints/best.weights.h5``) and the resume backup."""

    enabled: bool = True
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    every_seconds: float = Field(
        10.0,
        ge=0,
        description="Write checkpoints at most this often (and always at the end and on "
        "failure); 0 writes after every epoch. Bounds the cost of saving on short epochs.",
    )


class KerasFitParams(Params):
    """Train the model with ``model.fit``."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: OptimizerParams = Field(default_factory=OptimizerParams)
    loss: str | None = Field(None, description="Keras loss name. Default: the model's own.")
    metrics: list[str] | None = Field(None, description="Keras metric names.")
    loss_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weights of the model's named loss terms, e.g. {reconstruction: 1, kl: 0.5}.",
    )
    early_stopping: EarlyStoppingParams | None = None
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    resume: bool = Field(True, description="BackupAndRestore: a re-run of a killed run resumes.")
    nan_guard: bool = Field(True, description="Stop and fail when any logged loss is NaN/inf.")
    save_model: bool = Field(
        True, description="Save model/model.keras and log it (tuning trials skip it)."
    )
    shuffle: bool = True
    verbose: Literal["auto", 0, 1, 2] = Field(
        "auto", description="Keras progress output: auto is a bar in a terminal, else a line per epoch."
    )
    jit_compile: bool | Literal["auto"] = "auto"
    steps_per_execution: int = Field(1, ge=1)


@hookimpl
def register_stages(register):
    register("train", "keras_fit", "dlpipe.stages.train:keras_fit", KerasFitParams,
             "model.fit with optimizer, schedule, loss weights, checkpoints and a NaN guard.")
