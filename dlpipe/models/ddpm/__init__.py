"""``ddpm``: denoising diffusion in pixel space (U-Net, EMA, classifier-free guidance).

The Keras code is in :mod:`dlpipe.models.ddpm.model`. :class:`DiffusionCommonParams`
is shared with ``latent_diffusion``.
This module declares its parameters and registers ``"module:function"`` strings, so
importing it loads neither Keras nor TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params

_TINY_SAMPLING = {"timesteps": 20, "sample_steps": 4, "sample_every": 0}


class DiffusionCommonParams(Params):
    """The noise schedule, conditioning, EMA and sampler settings both architectures share."""

    timesteps: int = Field(1000, ge=2, le=10000, description="Length T of the diffusion chain.")
    schedule: Literal["linear", "cosine"] = Field(
        "cosine", description="Noise schedule: linear betas (DDPM) or cosine alpha_bar."
    )
    conditional: bool | None = Field(
        None,
        description="Condition on class labels (classifier-free guidance); null: when the "
        "data has labels.",
    )
    cond_drop: float = Field(
        0.1, ge=0.0, lt=1.0, description="Probability of training on the null label (CFG)."
    )
    guidance_scale: float = Field(
        2.0,
        ge=0.0,
        description="CFG at sampling: eps_u + s * (eps_c - eps_u); 0 unconditional, 1 "
        "plain conditional.",
    )
    ema_decay: float = Field(
        0.999, ge=0.0, lt=1.0, description="Decay of the weights' moving average used to sample."
    )
    sampler: Literal["ddpm", "ddim"] = Field(
        "ddim", description="ddpm: ancestral, all T steps; ddim: sample_steps steps."
    )
    sample_steps: int = Field(50, ge=2, description="DDIM: number of denoising steps.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM noise: 0 deterministic, 1 DDPM-like.")
    sample_every: int = Field(
        5, ge=0, description="Log a sample grid every N epochs (0: only at the end)."
    )
    emb_dim: int | None = Field(
        None, ge=2, description="Size of the time/label embedding. Default: 4 * first width."
    )


class DDPMParams(DiffusionCommonParams):
    """DDPM/DDIM on images with a small U-Net noise predictor."""

    widths: list[int] = Field(
        default_factory=lambda: [32, 64],
        description="U-Net channels per resolution level (each further level halves "
        "height and width).",
    )
    blocks_per_level: int = Field(1, ge=1, le=4, description="Residual blocks per level.")


@hookimpl
def register_models(register):
    register(
        "ddpm",
        build="dlpipe.models.ddpm.model:build",
        params=DDPMParams,
        description="Denoising diffusion (U-Net, linear/cosine schedule, EMA, CFG; DDPM/DDIM).",
        task="generative",
        loss_weights=("noise",),
        plots="dlpipe.models.ddpm.plots:plots",
        callbacks="dlpipe.models.ddpm.model:callbacks",
        example_params={**_TINY_SAMPLING, "widths": [8]},
    )
