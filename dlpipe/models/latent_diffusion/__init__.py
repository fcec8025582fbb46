"""``latent_diffusion``: diffusion in a trained autoencoder's or VAE's latent space.

The Keras code is in :mod:`dlpipe.models.latent_diffusion.model`.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.models.ddpm import DiffusionCommonParams
from dlpipe.params import Params

_TINY_SAMPLING = {"timesteps": 20, "sample_steps": 4, "sample_every": 0}


class SourceModel(Params):
    """Where latent diffusion gets its (trained) autoencoder or VAE: exactly one of
    ``stage``, ``run_id`` or ``uri``."""

    stage: str | None = Field(
        None, description="An earlier model stage of this pipeline (its name/id)."
    )
    run_id: str | None = Field(
        None, description="An MLflow run whose artifact `artifact_path` is the model."
    )
    uri: str | None = Field(
        None,
        description="A model URI (models:/NAME/VERSION, runs:/ID/model/model.keras) or a "
        "local .keras file.",
    )
    artifact_path: str = Field(
        "model/model.keras", description="run_id: the artifact holding the saved model."
    )
    tracking_uri: str | None = Field(
        None, description="run_id/uri: MLflow tracking URI. Default: the spec's tracking.uri."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceModel:
        given = [k for k in ("stage", "run_id", "uri") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of stage, run_id, uri (got {given or 'none'})")
        return self


class LatentDiffusionParams(DiffusionCommonParams):
    """Diffusion over the latent vectors of a trained autoencoder or VAE (frozen)."""

    autoencoder: SourceModel | None = Field(
        None,
        description="The autoencoder/VAE: {stage: NAME} | {run_id: ID} | {uri: URI}. "
        "null: the latest earlier model stage that has an encoder and a decoder.",
    )
    width: int = Field(256, ge=4, description="Width of the MLP denoiser.")
    depth: int = Field(3, ge=1, le=16, description="Residual blocks of the MLP denoiser.")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Noise schedule: linear betas (DDPM) or cosine alpha_bar."
    )


@hookimpl
def register_models(register):
    register(
        "latent_diffusion",
        build="dlpipe.models.latent_diffusion.model:build",
        params=LatentDiffusionParams,
        description="Diffusion in a trained autoencoder's/VAE's latent space (MLP denoiser).",
        task="generative",
        loss_weights=("noise",),
        plots="dlpipe.models.ddpm.plots:plots",
        callbacks="dlpipe.models.ddpm.model:callbacks",
        example_params={**_TINY_SAMPLING, "width": 16, "depth": 1},
    )
