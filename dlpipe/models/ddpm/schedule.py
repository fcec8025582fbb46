"""The forward process, the noise schedules and the two samplers' update rules of
denoising diffusion (NumPy, float64), for ``ddpm`` and ``latent_diffusion``.

The idea (Ho et al., 2020): fix a *forward process* that destroys an image ``x_0`` in
``T`` small Gaussian steps,

    q(x_t | x_0) = N(sqrt(alpha_bar_t) * x_0, (1 - alpha_bar_t) * I),

where ``alpha_bar_t`` falls from almost 1 to almost 0 (the *noise schedule*: ``linear``
betas as in the paper, or the ``cosine`` schedule of Nichol & Dhariwal, 2021). After
``T`` steps ``x_T`` is indistinguishable from ``N(0, I)``. A network
``eps_theta(x_t, t)`` is trained to predict the noise that was added, with a plain
mean-squared error on random ``t`` (the loss term ``noise``). Generating images runs
the process backwards from pure noise:

* ``ddpm``: ancestral sampling, all ``T`` steps, each drawing from the Gaussian
  posterior ``q(x_{t-1} | x_t, x_0)`` with ``x_0`` estimated from the predicted noise
  (:func:`ddpm_step`);
* ``ddim`` (Song et al., 2021): a non-Markovian process with the same marginals, so a
  short subsequence of ``sample_steps`` timesteps suffices (:func:`ddim_step`). ``eta``
  = 0 makes it deterministic; ``eta`` = 1 with every timestep is exactly DDPM (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from keras import ops

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")


@dataclass
class NoiseSchedule:
    """``betas``, ``alphas = 1 - betas`` and ``alpha_bars = cumprod(alphas)`` for
    timesteps ``0 .. timesteps - 1`` (index ``t`` is the paper's ``t + 1``).

    ``linear``: betas from 1e-4 to 0.02, rescaled by ``1000 / timesteps`` so that a
    shorter chain destroys the signal as completely as the paper's 1000 steps.
    ``cosine``: ``alpha_bar(t) = f(t) / f(0)`` with
    ``f(t) = cos((t / T + s) / (1 + s) * pi / 2) ** 2``, ``s = 0.008``, betas clipped
    at 0.999 (Nichol & Dhariwal); it destroys information more evenly over ``t``.
    """

    kind: str
    timesteps: int
    betas: np.ndarray = field(init=False, repr=False)
    alphas: np.ndarray = field(init=False, repr=False)
    alpha_bars: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.kind!r}")
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, not {self.timesteps}")
        steps = self.timesteps
        if self.kind == "linear":
            scale = 1000.0 / steps
            betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype="float64")
        else:
            s = 0.008
            f = np.cos((np.arange(steps + 1, dtype="float64") / steps + s) / (1 + s) * np.pi / 2)
            alpha_bar = f**2 / f[0] ** 2
            betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        self.betas = np.clip(betas, 1e-8, 0.999)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = np.cumprod(self.alphas)

    def alpha_bar_prev(self, t: int) -> float:
        """``alpha_bar`` one step before ``t``; 1 (no noise) before the first step."""
        return 1.0 if t < 0 else float(self.alpha_bars[t])


def q_sample(schedule: NoiseSchedule, x0: Any, t: Any, noise: Any) -> Any:
    """The forward process in one jump: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``.

    ``t`` holds one timestep per example (any shape with ``batch`` entries); works on
    tensors inside a traced step and on NumPy arrays alike (float32 result).
    """
    x0 = ops.cast(x0, "float32")
    alpha_bars = ops.convert_to_tensor(schedule.alpha_bars.astype("float32"))
    ab = ops.take(alpha_bars, ops.reshape(ops.cast(t, "int32"), (-1,)))
    ab = ops.reshape(ab, (-1,) + (1,) * (len(x0.shape) - 1))
    return ops.sqrt(ab) * x0 + ops.sqrt(1.0 - ab) * ops.cast(noise, "float32")


def predict_x0(
    x_t: np.ndarray, eps: np.ndarray, alpha_bar: float, clip: float | None
) -> np.ndarray:
    """The clean-sample estimate ``(x_t - sqrt(1 - a) eps) / sqrt(a)``, optionally clipped
    to ``[-clip, clip]``."""
    x0 = (x_t - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return np.clip(x0, -clip, clip) if clip is not None else x0


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: np.ndarray,
    eps: np.ndarray,
    t: int,
    noise: np.ndarray,
    clip: float | None = 1.0,
) -> np.ndarray:
    """One ancestral step ``x_t -> x_{t-1}``: a draw from the posterior
    ``q(x_{t-1} | x_t, x_0)`` with ``x_0`` estimated from ``eps``.

    Posterior mean ``c0 * x0 + ct * x_t`` with ``c0 = sqrt(ab_prev) beta / (1 - ab)`` and
    ``ct = sqrt(alpha) (1 - ab_prev) / (1 - ab)``; variance
    ``beta (1 - ab_prev) / (1 - ab)`` (0 at the last step).
    """
    beta, alpha = float(schedule.betas[t]), float(schedule.alphas[t])
    ab, ab_prev = float(schedule.alpha_bars[t]), schedule.alpha_bar_prev(t - 1)
    x0 = predict_x0(x_t, eps, ab, clip)
    c0 = math.sqrt(ab_prev) * beta / (1.0 - ab)
    ct = math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab)
    variance = beta * (1.0 - ab_prev) / (1.0 - ab)
    return c0 * x0 + ct * x_t + math.sqrt(variance) * noise


def ddim_step(
    schedule: NoiseSchedule,
    x_t: np.ndarray,
    eps: np.ndarray,
    t: int,
    t_prev: int,
    eta: float,
    noise: np.ndarray,
    clip: float | None = 1.0,
) -> np.ndarray:
    """One DDIM step ``x_t -> x_{t_prev}`` (``t_prev = -1``: to the clean sample).

    ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``. ``eps`` is
    re-derived from the (clipped) ``x0`` so that both estimates agree.
    """
    ab, ab_prev = float(schedule.alpha_bars[t]), schedule.alpha_bar_prev(t_prev)
    x0 = predict_x0(x_t, eps, ab, clip)
    eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab)) * math.sqrt(1.0 - ab / ab_prev)
    direction = math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    return math.sqrt(ab_prev) * x0 + direction + sigma * noise


def sampling_timesteps(sampler: str, timesteps: int, sample_steps: int) -> list[int]:
    """The timesteps a sampler visits, from noisiest to cleanest.

    ``ddpm``: all of them. ``ddim``: ``sample_steps`` evenly spaced ones (always
    including ``timesteps - 1`` and 0).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
    if sampler == "ddpm" or sample_steps >= timesteps:
        return list(range(timesteps - 1, -1, -1))
    steps = np.unique(np.linspace(0, timesteps - 1, max(sample_steps, 2)).round().astype(int))
    return [int(t) for t in steps[::-1]]
