"""The spec's own settings and the validated spec that a run reads.

:class:`SpecSettings` and the classes it holds describe the keys a spec has besides
each plugin's ``params``; ``dlpipe schema`` is built from them. :class:`ResolvedSpec`
is what :func:`~dlpipe.spec.validate` returns: every stage with its params parsed by
its plugin's schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dlpipe.params import Params
from dlpipe.plugins import MODEL_STAGE_RUN, ModelEntry, Registry

TOP_LEVEL_KEYS = (
    "name", "experiment", "seed", "precision", "strategy", "tracking", "plugins", "stages"
)


class TrackingSpec(BaseModel):
    """Where and how the run is tracked."""

    # ``register`` is the spec's key; the field has another name because pydantic's
    # BaseModel has a ``register`` attribute.
    model_config = ConfigDict(extra="forbid", validate_by_name=False, serialize_by_alias=True)

    class Registration(BaseModel):
        """Register the run's model in the MLflow model registry."""

        model_config = ConfigDict(extra="forbid", regex_engine="python-re")

        name: str = Field(
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$",
            description="Registered model name (letters, digits, '_', '-', '.'); the "
            "run's model becomes its next version.",
        )
        alias: str | None = Field(
            None,
            pattern=r"^(?![vV][0-9]+$)(?![Ll][Aa][Tt][Ee][Ss][Tt]$)[A-Za-z0-9_-]{1,255}$",
            description="Alias moved to the new version, e.g. champion (then "
            "models:/NAME@champion loads it). Not 'latest', not like a version (v3).",
        )

    enabled: bool = Field(True, description="Track the run in MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlruns/mlflow.db.",
    )
    artifact_location: str | None = Field(
        None, description="Artifact root for new experiments. Default: mlruns/artifacts."
    )
    run_name: str | None = Field(None, description="MLflow run name. Default: the spec's name.")
    attach_run_id: str | None = Field(
        None,
        description="Log into this existing MLflow run instead of starting one, and leave "
        "it open. Tune workers started by --workers use it to nest their trials under "
        "the study's run.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra run tags.")
    log_model: bool = Field(
        True,
        description="Log the trained model as an MLflow model under the artifact path "
        "`model` (Keras and pyfunc flavours, model.keras, a TF SavedModel); see "
        "docs/using-models.md.",
    )
    export: bool = Field(
        True,
        description="Add inference-only exports to the logged model: a TF SavedModel "
        "(and ONNX where tf2onnx is installed), for the architectures that export.",
    )
    registration: Registration | None = Field(
        None,
        alias="register",
        description="Register the logged model: {name: NAME, alias: champion} makes it "
        "the next version of NAME and points the alias at it.",
    )
    mlflow_flavor: bool = Field(
        False,
        description="Deprecated and ignored: the logged model always has the MLflow "
        "Keras flavour.",
    )

    def model_post_init(self, context: Any) -> None:
        if self.registration is not None and not self.log_model:
            raise ValueError("register needs log_model: true (the logged model is registered)")


class StrategySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use: str = "auto"
    params: dict[str, Any] = Field(default_factory=dict)


class StageSpec(BaseModel):
    """One stage: its kind, the plugin implementing it, and that plugin's params."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="data, augment, model, train, evaluate, tune, ...")
    use: str = Field(description="The registered implementation (for model: the architecture).")
    name: str | None = Field(
        None, description="Name used in dotted paths (--set NAME.param=...). Default: the kind."
    )
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name or self.kind


class SpecSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Pipeline name; also the default MLflow run name.")
    experiment: str | None = Field(None, description="MLflow experiment. Default: the name.")
    seed: int = Field(
        0, ge=0, lt=2**32, description="Global seed for Python, NumPy and the backend."
    )
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32",
        description="Keras dtype policy. mixed_float16 computes in float16 with float32 "
        "weights and dynamic loss scaling (models with their own train_step apply it too).",
    )
    strategy: str | StrategySpec = Field(
        "auto", description="Distribution strategy: auto, cpu, one_device, mirrored, ..."
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    plugins: list[str] = Field(
        default_factory=list, description="Extra plugins: module names or .py paths."
    )
    stages: list[StageSpec] = Field(min_length=1)


@dataclass
class ResolvedStage:
    """A validated stage, with its parameters parsed by its plugin's schema."""

    spec: StageSpec
    params: Params
    plugin: str
    index: int

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def use(self) -> str:
        return self.spec.use


@dataclass
class ResolvedSpec:
    """A spec that passed validation."""

    source: str
    raw: dict[str, Any]  # after overrides, as plain data
    settings: SpecSettings
    stages: list[ResolvedStage]
    strategy_name: str
    strategy_params: Params
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def experiment(self) -> str:
        return self.settings.experiment or self.settings.name

    def stage(self, stage_id: str) -> ResolvedStage | None:
        return next((s for s in self.stages if s.id == stage_id), None)

    def resolved_dict(self) -> dict[str, Any]:
        """The full spec with every default filled in, as plain data."""
        out = self.settings.model_dump(mode="json", exclude={"stages", "strategy"})
        out["strategy"] = {
            "use": self.strategy_name,
            "params": self.strategy_params.model_dump(mode="json"),
        }
        out["stages"] = [
            {
                "kind": s.kind,
                "use": s.use,
                "name": s.id,
                "params": s.params.model_dump(mode="json"),
            }
            for s in self.stages
        ]
        return out

    def digest(self) -> str:
        """A short hash of what determines the training (tracking settings excluded)."""
        d = self.resolved_dict()
        d.pop("tracking", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def architecture(stages: Sequence[ResolvedStage], registry: Registry) -> ModelEntry | None:
    """The registered architecture of the last of ``stages`` that builds a model.

    ``None`` when none builds one, or when the last that does is a plugin's own stage
    rather than the model stage (whose ``use`` names an architecture).
    """
    for stage in reversed(stages):
        entry = registry.lookup_stage(stage.kind, stage.use)
        if entry is not None and entry.builds_model:
            return registry.models.get(stage.use) if entry.run == MODEL_STAGE_RUN else None
    return None
