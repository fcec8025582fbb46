"""Built-in training stage: ``model.fit`` with the options a spec can set.

The options are described with YAML examples in ``docs/training.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from dlpipe import hookimpl
from dlpipe.errors import close_matches
from dlpipe.params import Params


class ScheduleParams(Params):
    """A learning-rate schedule; decay lengths are counted in epochs."""

    name: Literal["constant", "cosine", "exponential", "step"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up from 0 to the peak rate.")
    decay_rate: float = Field(0.5, gt=0, description="exponential/step: factor per decay period.")
    decay_epochs: float = Field(10.0, gt=0, description="exponential/step: epochs per period.")
    alpha: float = Field(0.0, ge=0, description="cosine: final rate as a fraction of the peak.")


#: Optimizers with Adam's two moment decay rates.
ADAM_FAMILY = ("adam", "adamw", "nadam")


class OptimizerParams(Params):
    name: Literal["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    momentum: float | None = Field(None, ge=0, description="sgd/rmsprop momentum.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum.")
    beta_1: float | None = Field(
        None, ge=0, lt=1, description="adam/adamw/nadam: decay of the first moment (Keras: 0.9)."
    )
    beta_2: float | None = Field(
        None, ge=0, lt=1, description="adam/adamw/nadam: decay of the second moment (Keras: 0.999)."
    )
    epsilon: float | None = Field(
        None, gt=0, description="Added to the denominator (all but sgd; Keras: 1e-7)."
    )
    weight_decay: float | None = Field(None, ge=0, description="Decoupled weight decay.")
    clipnorm: float | None = Field(None, gt=0, description="Clip each gradient's norm.")
    clipvalue: float | None = Field(None, gt=0, description="Clip gradient values.")
    global_clipnorm: float | None = Field(None, gt=0, description="Clip the global norm.")
    schedule: ScheduleParams | None = None

    @model_validator(mode="after")
    def _applies(self) -> OptimizerParams:
        betas = [k for k in ("beta_1", "beta_2") if getattr(self, k) is not None]
        if betas and self.name not in ADAM_FAMILY:
            raise ValueError(f"{' and '.join(betas)}: only adam, adamw and nadam have betas, not {self.name}")
        if self.epsilon is not None and self.name == "sgd":
            raise ValueError("sgd has no epsilon")
        return self


#: Loss names the structured ``loss`` option understands (options below apply to them).
STRUCTURED_LOSSES = (
    "mse",
    "mae",
    "huber",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "binary_focal_crossentropy",
    "categorical_focal_crossentropy",
    "sparse_categorical_focal_crossentropy",
)
#: Further Keras loss names, accepted by name alone (no options).
KERAS_LOSSES = (
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error", "mape",
    "mean_squared_logarithmic_error", "msle", "kl_divergence", "kld", "log_cosh", "logcosh",
    "poisson", "hinge", "squared_hinge", "categorical_hinge", "cosine_similarity", "dice",
    "tversky", "circle", "ctc", "categorical_generalized_cross_entropy",
)


def _loss_from_name(value: Any) -> Any:
    """``loss: mse`` (a plain Keras name, as before) means ``loss: {name: mse}``."""
    return {"name": value} if isinstance(value, str) else value


class LossParams(Params):
    """A loss by name, with the options that apply to it. A plain string is a name."""

    name: str = Field(
        description="mse, mae, huber, (sparse_)categorical_crossentropy, binary_crossentropy, "
        "binary/categorical/sparse_categorical_focal_crossentropy, or another Keras loss name."
    )
    delta: float | None = Field(None, gt=0, description="huber: where squared becomes linear (1).")
    label_smoothing: float | None = Field(
        None, ge=0, lt=1, description="Cross-entropy/focal: mass spread uniformly over classes."
    )
    gamma: float | None = Field(None, ge=0, description="Focal: focusing exponent (2; 0 is CE).")
    alpha: float | None = Field(
        None, ge=0, le=1, description="Focal: balance factor (binary: weight of positives)."
    )
    class_weights: list[float] | dict[int | str, float] | Literal["balanced"] | None = Field(
        None,
        description="Classification: loss weight per true class, a list by class index, a "
        "mapping by index or class name, or 'balanced' (from the training labels).",
    )
    from_logits: bool = Field(False, description="Classification: the model outputs logits.")

    def is_classification(self) -> bool:
        return "crossentropy" in self.name

    def options(self) -> list[str]:
        """The options that are set (``from_logits`` counts when true)."""
        keys = ("delta", "label_smoothing", "gamma", "alpha", "class_weights")
        return [k for k in keys if getattr(self, k) is not None] + (
            ["from_logits"] if self.from_logits else []
        )

    @model_validator(mode="after")
    def _applies(self) -> LossParams:
        name = self.name
        if name not in STRUCTURED_LOSSES and name not in KERAS_LOSSES and ">" not in name:
            similar = close_matches(name, [*STRUCTURED_LOSSES, *KERAS_LOSSES])
            hint = f"; did you mean: {', '.join(similar)}?" if similar else ""
            raise ValueError(f"unknown loss {name!r}{hint}")
        allowed: set[str] = set()
        if name == "huber":
            allowed = {"delta"}
        elif self.is_classification() and name in STRUCTURED_LOSSES:
            allowed = {"label_smoothing", "class_weights", "from_logits"}
            if "focal" in name:
                allowed |= {"gamma", "alpha"}
        wrong = [k for k in self.options() if k not in allowed]
        if wrong:
            raise ValueError(f"option(s) {', '.join(wrong)} do not apply to loss {name!r}")
        if isinstance(self.class_weights, list) and any(w < 0 for w in self.class_weights):
            raise ValueError("class_weights must not be negative")
        return self


class RegularizationRule(Params):
    """L1/L2 weight penalties for the kernels of the layers a glob matches."""

    layers: str = Field(
        description="Glob matched (case-insensitively) against layer names and class names, "
        "e.g. 'conv*' (Conv2D layers, layers named conv...), 'dense_1', '*'."
    )
    l1: float = Field(0.0, ge=0, description="L1 factor: adds l1 * sum(|w|) to the loss.")
    l2: float = Field(0.0, ge=0, description="L2 factor: adds l2 * sum(w^2) to the loss.")


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


class DivergenceParams(Params):
    """Stop a run whose loss explodes without reaching NaN (see ``docs/training.md``)."""

    enabled: bool = True
    factor: float = Field(
        100.0,
        gt=1,
        description="Stop when the training loss exceeds factor x a reference: log(classes) "
        "for a classifier trained with cross-entropy, else the first epoch's loss.",
    )
    max_loss: float | None = Field(
        None, gt=0, description="Also stop when the training loss exceeds this value."
    )


class KerasFitParams(Params):
    """Train the model with ``model.fit``."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: OptimizerParams = Field(default_factory=OptimizerParams)
    loss: Annotated[
        LossParams | None, BeforeValidator(_loss_from_name, json_schema_input_type=str | LossParams | None)
    ] = Field(
        None,
        description="A Keras loss name, or {name, delta, label_smoothing, gamma, alpha, "
        "class_weights, from_logits}. Default: the model's own (by task).",
    )
    metrics: list[str] | None = Field(None, description="Keras metric names.")
    loss_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weights of the model's named loss terms, e.g. {reconstruction: 1, kl: 0.5}.",
    )
    regularization: list[RegularizationRule] = Field(
        default_factory=list,
        description="L1/L2 penalties per layer group; the last rule matching a layer wins.",
    )
    class_weight: Literal["balanced"] | dict[int | str, float] | None = Field(
        None,
        description="Weight training examples by class: 'balanced' (n / (classes * n_c) from "
        "the training labels) or {class index or name: weight}. Multiplies sample weights.",
    )
    oversample: bool = Field(
        False,
        description="Resample the training split (seeded, with replacement) so every class "
        "has as many examples as the largest one.",
    )
    early_stopping: EarlyStoppingParams | None = None
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    restore_best: bool = Field(
        False,
        description="After training, load the best checkpoint (checkpoint.monitor) into the "
        "model before it is saved and evaluated.",
    )
    resume: bool = Field(
        True,
        description="Keep a resume snapshot in the run folder (every checkpoint.every_seconds): "
        "a re-run of a killed or failed run continues where it stopped.",
    )
    nan_guard: bool = Field(True, description="Stop and fail when any logged loss is NaN/inf.")
    divergence: DivergenceParams = Field(
        default_factory=DivergenceParams,
        description="Stop and fail when the training loss explodes (on by default).",
    )
    save_model: bool = Field(
        True, description="Save model/model.keras and log it (tuning trials skip it)."
    )
    shuffle: bool = True
    verbose: Literal["auto", 0, 1, 2] = Field(
        "auto", description="Keras progress output: auto is a bar in a terminal, else a line per epoch."
    )
    jit_compile: bool | Literal["auto"] = Field(
        "auto",
        description="XLA compilation of the train, evaluate and predict steps. auto: "
        "Keras's default (XLA with one GPU and strategy auto when every layer supports it; "
        "not on a CPU-only machine, nor under an explicit strategy), but never for an "
        "architecture registered with xla=False; true: always (an error for an xla=False "
        "architecture); false: never.",
    )
    steps_per_execution: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> KerasFitParams:
        if self.restore_best and not self.checkpoint.enabled:
            raise ValueError("restore_best needs checkpoint.enabled: true")
        return self

    def loss_weight_paths(self) -> dict[str, tuple[str, ...]]:
        """The terms ``loss_weights`` weights, each set at ``loss_weights.<term>``."""
        return {term: ("loss_weights", term) for term in self.loss_weights}


@hookimpl
def register_stages(register):
    register("train", "keras_fit", "dlpipe.stages.train.fit:keras_fit", KerasFitParams,
             "model.fit with optimizer, schedule, losses, regularization, class balancing, "
             "checkpoints, resume, and NaN and divergence guards.")
