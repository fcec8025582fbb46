"""Denoising diffusion (DDPM, DDIM) with classifier-free guidance, for the ``ddpm`` architecture.

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
  posterior ``q(x_{t-1} | x_t, x_0)`` with ``x_0`` estimated from the predicted noise;
* ``ddim`` (Song et al., 2021): a non-Markovian process with the same marginals, so a
  short subsequence of ``sample_steps`` timesteps suffices. ``eta`` = 0 makes it
  deterministic; ``eta`` = 1 with every timestep is exactly DDPM (tested).

The noise predictor is a small U-Net: residual blocks of GroupNorm -> swish -> 3x3
convolution, one resolution level per entry of ``widths`` (stride-2 convolutions down,
nearest upsampling up, skip connections across). A sinusoidal embedding of ``t``
conditions every residual block as a per-channel scale and shift after its second
normalization (:class:`ScaleShift`).

**Class conditioning with classifier-free guidance** (Ho & Salimans, 2021): a learned
label embedding is added to the time embedding. During training each label is
replaced by an extra "null" class with probability ``cond_drop``, so the same network
also learns the unconditional model. At sampling time both are evaluated and mixed,
``eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``: 0 is unconditional,
1 plain conditional, larger values trade diversity for class fidelity.

**EMA.** Sampling uses an exponential moving average of the weights (``ema_network``,
decay ``ema_decay``, warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n``
steps so that short runs are not stuck near the initial weights).

Images are mapped from the data's value range to [-1, 1] for diffusion and back;
:meth:`DiffusionModel.generate_samples` returns images in the data's range. The
sampling loop itself is NumPy around ``predict_on_batch`` of the (compiled) network:
readable, seedable, and the same for every sampler. :class:`DiffusionModel` knows
nothing about images beyond :meth:`~DiffusionModel.to_diffusion` /
:meth:`~DiffusionModel.from_diffusion`; :mod:`dlpipe.models.latent_diffusion.model`
overrides those two to diffuse in an autoencoder's latent space.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from dlpipe.models import grids
from dlpipe.models.common import apply_gradients, make_loss_weights, replica_scaled

LOSS_TERMS = ("noise",)
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")

# --------------------------------------------------------------------------------------
# Noise schedules and the two samplers' update rules (NumPy, float64)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The noise-prediction U-Net
# --------------------------------------------------------------------------------------


def sinusoidal_embedding(t: Any, dim: int, max_period: float = 10000.0) -> Any:
    """``(batch,)`` timesteps -> ``(batch, dim)`` features ``[sin(t f_i), cos(t f_i)]``
    with frequencies ``f_i = max_period ** (-i / (dim / 2))``, ``i = 0 .. dim/2 - 1``
    (the Transformer's position encoding, applied to the diffusion step)."""
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(half, dtype="float32") / float(half))
    angles = ops.cast(ops.reshape(t, (-1, 1)), "float32") * ops.reshape(freqs, (1, half))
    return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


@keras.saving.register_keras_serializable(package="dlpipe")
class SinusoidalEmbedding(layers.Layer):
    """Layer form of :func:`sinusoidal_embedding`: ``(batch, 1)`` int steps -> ``(batch, dim)``.

    Computed in float32 whatever the dtype policy (large angles lose precision in
    float16).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if dim < 2 or dim % 2:
            raise ValueError(f"the embedding size must be even and >= 2, not {dim}")
        self.dim = int(dim)
        self.max_period = float(max_period)

    def call(self, t: Any) -> Any:
        return sinusoidal_embedding(t, self.dim, self.max_period)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim, "max_period": self.max_period}


def group_norm(channels: int, name: str) -> layers.Layer:
    """GroupNorm with up to 8 groups (as many as divide ``channels``)."""
    return layers.GroupNormalization(groups=math.gcd(int(channels), 8), name=name)


@keras.saving.register_keras_serializable(package="dlpipe")
class ScaleShift(layers.Layer):
    """``h * (1 + scale) + shift`` with ``[scale, shift]`` per example and channel.

    Called on ``[h, params]`` with ``params`` of shape ``(batch, 2 * channels)``; the
    conditioning of a residual block, applied right after its normalization (a plain
    added bias before a GroupNorm of one channel per group would be normalized away).
    """

    def call(self, inputs: Any) -> Any:
        h, params = inputs
        channels = h.shape[-1]
        params = ops.reshape(
            ops.cast(params, h.dtype), (-1,) + (1,) * (len(h.shape) - 2) + (2 * channels,)
        )
        scale, shift = params[..., :channels], params[..., channels:]
        return h * (1.0 + scale) + shift

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]


def residual_block(h: Any, emb: Any, width: int, name: str) -> Any:
    """GroupNorm -> swish -> conv, GroupNorm -> scale/shift by the embedding -> swish ->
    conv, added to a (1x1-projected) skip."""
    skip = h if h.shape[-1] == width else layers.Conv2D(width, 1, name=f"{name}_skip")(h)
    h = group_norm(h.shape[-1], f"{name}_norm0")(h)
    h = layers.Conv2D(width, 3, padding="same", name=f"{name}_conv0")(
        layers.Activation("swish", name=f"{name}_act0")(h)
    )
    scale_shift = layers.Dense(2 * width, name=f"{name}_emb")(
        layers.Activation("swish", name=f"{name}_emb_act")(emb)
    )
    h = ScaleShift(name=f"{name}_condition")([group_norm(width, f"{name}_norm1")(h), scale_shift])
    h = layers.Conv2D(width, 3, padding="same", name=f"{name}_conv1")(
        layers.Activation("swish", name=f"{name}_act1")(h)
    )
    return layers.Add(name=f"{name}_out")([skip, h])


def conditioning_embedding(
    t: Any, label: Any, emb_dim: int, num_classes: int, sinusoid_dim: int
) -> Any:
    """Time embedding (sinusoid -> Dense -> swish -> Dense), plus a learned embedding of
    the label (``num_classes + 1`` entries: the last is the null class) when given."""
    emb = SinusoidalEmbedding(sinusoid_dim, name="time_sinusoid")(t)
    emb = layers.Dense(emb_dim, activation="swish", name="time_dense0")(emb)
    emb = layers.Dense(emb_dim, name="time_dense1")(emb)
    if label is not None:
        label_emb = layers.Embedding(num_classes + 1, emb_dim, name="label_embedding")(label)
        emb = layers.Add(name="time_plus_label")(
            [emb, layers.Flatten(name="label_flat")(label_emb)]
        )
    return emb


def build_unet(
    input_shape: Sequence[int],
    widths: Sequence[int],
    num_classes: int = 0,
    blocks_per_level: int = 1,
    emb_dim: int | None = None,
) -> keras.Model:
    """``[x_t, t]`` (+ ``label`` when ``num_classes``) -> predicted noise, float32.

    One level per entry of ``widths``; between levels a stride-2 convolution halves the
    resolution, so height and width must divide by ``2 ** (len(widths) - 1)``. The
    output convolution starts at zero (the first prediction is "no noise").
    """
    height, width, channels = (int(d) for d in input_shape)
    widths = [int(w) for w in widths]
    emb_dim = int(emb_dim or 4 * widths[0])
    x_t = keras.Input(shape=(height, width, channels), name="x_t")
    t = keras.Input(shape=(1,), dtype="int32", name="t")
    inputs = [x_t, t]
    label = None
    if num_classes:
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        inputs.append(label)
    sinusoid_dim = max(2, widths[0] - widths[0] % 2)
    emb = conditioning_embedding(t, label, emb_dim, num_classes, sinusoid_dim)

    h = layers.Conv2D(widths[0], 3, padding="same", name="stem")(x_t)
    skips = []
    for level, w in enumerate(widths):
        for b in range(blocks_per_level):
            h = residual_block(h, emb, w, f"down{level}_block{b}")
        skips.append(h)
        if level < len(widths) - 1:
            h = layers.Conv2D(w, 3, strides=2, padding="same", name=f"down{level}_downsample")(h)
    if len(widths) > 1:  # at the coarsest resolution, between the two paths
        h = residual_block(h, emb, widths[-1], "middle_block")
    for level in reversed(range(len(widths))):
        h = layers.Concatenate(name=f"up{level}_skip")([h, skips[level]])
        for b in range(blocks_per_level):
            h = residual_block(h, emb, widths[level], f"up{level}_block{b}")
        if level > 0:
            h = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(h)
            h = layers.Conv2D(widths[level - 1], 3, padding="same", name=f"up{level}_conv")(h)
    h = layers.Activation("swish", name="out_act")(group_norm(widths[0], "out_norm")(h))
    eps = layers.Conv2D(
        channels, 3, padding="same", kernel_initializer="zeros", dtype="float32", name="noise"
    )(h)
    return keras.Model(inputs, eps, name="unet")


# --------------------------------------------------------------------------------------
# The model: training step, EMA, sampling
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class DiffusionModel(keras.Model):
    """A noise-prediction ``network`` trained with the DDPM objective, plus its EMA copy.

    :param network: ``[x_t, t]`` or ``[x_t, t, label]`` -> predicted noise (float32).
        ``t`` and ``label`` are ``(batch, 1)`` int32; label ``num_classes`` is "null".
    :param timesteps: length ``T`` of the diffusion chain.
    :param schedule: ``linear`` or ``cosine``.
    :param num_classes: 0 for an unconditional model.
    :param cond_drop: probability of training on the null label (classifier-free guidance).
    :param ema_decay: decay of the weights' exponential moving average used for sampling.
    :param sampler, sample_steps, eta, guidance_scale: defaults for :meth:`sample`.
    :param value_range: the data's range, mapped to [-1, 1] for diffusion.
    :param clip_denoised: clip each ``x_0`` estimate to ``[-clip, clip]`` (None: never).
    :param sample_every: the sample-grid callback's period in epochs (0: only at the end).
    :param seed: seed of the training noise.

    Compile with an optimizer only: the loss (term ``noise``) is built in.
    ``model(x)`` returns a one-shot reconstruction of ``x`` noised to step ``T // 4``
    (a cheap check for Keras's ``predict``); :meth:`generate_samples` generates.
    """

    def __init__(
        self,
        network: keras.Model,
        timesteps: int = 1000,
        schedule: str = "cosine",
        num_classes: int = 0,
        cond_drop: float = 0.1,
        ema_decay: float = 0.999,
        sampler: str = "ddim",
        sample_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 2.0,
        value_range: Sequence[float] = (-1.0, 1.0),
        clip_denoised: float | None = 1.0,
        sample_every: int = 5,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), not {cond_drop}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), not {ema_decay}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
        self.network = network
        self.timesteps = int(timesteps)
        self.schedule = str(schedule)
        self.noise_schedule = NoiseSchedule(self.schedule, self.timesteps)
        self.num_classes = int(num_classes)
        self.conditional = self.num_classes > 0
        self.cond_drop = float(cond_drop)
        self.ema_decay = float(ema_decay)
        self.sampler = sampler
        self.sample_steps = int(sample_steps)
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.value_range = [float(v) for v in value_range]
        self.clip_denoised = None if clip_denoised is None else float(clip_denoised)
        self.sample_every = int(sample_every)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # The EMA copy: same architecture, its own (non-trainable) variables.
        self.ema_network = keras.models.clone_model(network)
        self.ema_network.set_weights(network.get_weights())
        self.ema_network.trainable = False
        self.loss_weights = make_loss_weights(LOSS_TERMS)
        self.noise_loss_tracker = keras.metrics.Mean(name="loss")

    # --- data space <-> diffusion space (overridden by latent diffusion) ------------

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in diffusion space (the network's ``x_t``)."""
        return tuple(int(d) for d in self.network.inputs[0].shape[1:])

    def to_diffusion(self, x: Any) -> Any:
        """Data -> diffusion space: the data's value range mapped linearly to [-1, 1]."""
        low, high = self.value_range
        return (ops.cast(x, "float32") - low) * (2.0 / (high - low)) - 1.0

    def from_diffusion(self, x: Any) -> Any:
        """Diffusion space -> data space (the inverse of :meth:`to_diffusion`)."""
        low, high = self.value_range
        return (ops.cast(x, "float32") + 1.0) * ((high - low) / 2.0) + low

    # --- the forward process and the loss -----------------------------------------

    def q_sample(self, x0: Any, t: Any, noise: Any) -> Any:
        """A draw from ``q(x_t | x_0)`` (see :func:`q_sample`)."""
        return q_sample(self.noise_schedule, x0, t, noise)

    def _labels(self, labels: Any) -> Any:
        """``(batch, 1)`` int32 labels; one-hot labels are decoded."""
        if labels is None:
            raise ValueError(f"{self.name}: a class-conditional model needs labels")
        if len(labels.shape) > 1 and labels.shape[-1] not in (None, 1):
            labels = ops.argmax(labels, axis=-1)
        return ops.reshape(ops.cast(labels, "int32"), (-1, 1))

    def drop_labels(self, labels: Any, prob: float) -> Any:
        """Replace each label by the null class (``num_classes``) with probability ``prob``."""
        if prob <= 0:
            return labels
        drop = keras.random.uniform(ops.shape(labels), seed=self.seed_generator) < prob
        return ops.where(drop, ops.full_like(labels, self.num_classes), labels)

    def noise_loss(self, x: Any, labels: Any = None, training: bool = False) -> Any:
        """Mean squared error of the predicted noise at random timesteps (float32)."""
        x0 = self.to_diffusion(x)
        batch = ops.shape(x0)[0]
        t = keras.random.randint((batch, 1), 0, self.timesteps, seed=self.seed_generator)
        noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator)
        inputs = [self.q_sample(x0, t, noise), t]
        if self.conditional:
            labels = self._labels(labels)
            inputs.append(self.drop_labels(labels, self.cond_drop) if training else labels)
        eps = ops.cast(self.network(inputs, training=training), "float32")
        return ops.mean(ops.square(eps - noise))

    def update_ema(self, decay: Any) -> None:
        """``ema <- decay * ema + (1 - decay) * weights``, variable by variable."""
        for ema_var, var in zip(self.ema_network.weights, self.network.weights, strict=True):
            ema_var.assign(decay * ema_var + (1.0 - decay) * ops.cast(var, ema_var.dtype))

    def ema_decay_now(self) -> Any:
        """The EMA decay for the current step: ``min(ema_decay, (1 + n) / (10 + n))``."""
        n = ops.cast(self.optimizer.iterations, "float32")
        return ops.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

    @property
    def metrics(self) -> list[Any]:
        return [self.noise_loss_tracker]

    def train_step(self, data: Any) -> dict[str, Any]:
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss = self.loss_weights["noise"] * self.noise_loss(x, labels, training=True)
            scaled = replica_scaled(loss)
        apply_gradients(self.optimizer, tape, scaled, self.network.trainable_variables)
        self.update_ema(self.ema_decay_now())
        self.noise_loss_tracker.update_state(loss)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data: Any) -> dict[str, Any]:
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        loss = self.loss_weights["noise"] * self.noise_loss(x, labels, training=False)
        self.noise_loss_tracker.update_state(loss)
        return {m.name: m.result() for m in self.metrics}

    def build(self, input_shape: Any = None) -> None:
        # network and ema_network are built functional models.
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        # A one-shot reconstruction: noise x to T // 4, predict x_0, map back.
        x0 = self.to_diffusion(inputs)
        batch = ops.shape(x0)[0]
        t_value = self.timesteps // 4
        t = ops.full((batch, 1), t_value, dtype="int32")
        noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator)
        net_inputs = [self.q_sample(x0, t, noise), t]
        if self.conditional:
            net_inputs.append(ops.full((batch, 1), self.num_classes, dtype="int32"))
        network = self.network if training else self.ema_network
        eps = ops.cast(network(net_inputs, training=training), "float32")
        ab = float(self.noise_schedule.alpha_bars[t_value])
        x0_hat = (net_inputs[0] - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if self.clip_denoised is not None:
            x0_hat = ops.clip(x0_hat, -self.clip_denoised, self.clip_denoised)
        return self.from_diffusion(x0_hat)

    # --- reverse process (NumPy loop around the compiled network) -------------------

    def predict_noise(
        self,
        x_t: np.ndarray,
        t: int | np.ndarray,
        labels: np.ndarray | None = None,
        use_ema: bool = True,
    ) -> np.ndarray:
        """The network's noise prediction for a NumPy batch (``labels`` None: null class)."""
        x_t = np.asarray(x_t, dtype="float32")
        n = len(x_t)
        t_arr = np.broadcast_to(np.asarray(t, dtype="int32").reshape(-1, 1), (n, 1)).copy()
        inputs = [x_t, t_arr]
        if self.conditional:
            if labels is None:
                labels = np.full(n, self.num_classes)
            inputs.append(np.asarray(labels, dtype="int32").reshape(n, 1))
        network = self.ema_network if use_ema else self.network
        return np.asarray(network.predict_on_batch(inputs), dtype="float32")

    def guided_noise(
        self,
        x_t: np.ndarray,
        t: int,
        labels: np.ndarray | None,
        guidance_scale: float,
        use_ema: bool = True,
    ) -> np.ndarray:
        """Classifier-free guidance: ``eps_u + guidance_scale * (eps_c - eps_u)``.

        Unconditional models, and ``labels=None``, give the unconditional prediction;
        ``guidance_scale == 1`` the plain conditional one (one network pass). Otherwise
        both predictions come from one batch of twice the size.
        """
        if not self.conditional or labels is None:
            return self.predict_noise(x_t, t, None, use_ema)
        labels = np.asarray(labels, dtype="int32").reshape(-1)
        if guidance_scale == 1.0:
            return self.predict_noise(x_t, t, labels, use_ema)
        n = len(x_t)
        null = np.full(n, self.num_classes, dtype="int32")
        both = self.predict_noise(
            np.concatenate([x_t, x_t]), t, np.concatenate([labels, null]), use_ema
        )
        cond, uncond = both[:n], both[n:]
        return uncond + guidance_scale * (cond - uncond)

    def sample(
        self,
        n: int,
        labels: np.ndarray | None = None,
        seed: int = 0,
        sampler: str | None = None,
        sample_steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        keep: int = 0,
    ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
        """Run the reverse process for ``n`` samples in diffusion space.

        Unset options default to the model's. All randomness (the start noise and the
        noise of every step, drawn in the same order for both samplers) comes from
        ``np.random.default_rng(seed)``. With ``keep`` > 1 the second return value
        holds ``keep`` snapshots ``(label, x)`` of the trajectory: the start noise,
        evenly spaced intermediate ``x_t`` and the result; otherwise it is empty.
        """
        sampler = sampler or self.sampler
        steps = sampling_timesteps(sampler, self.timesteps, sample_steps or self.sample_steps)
        eta = self.eta if eta is None else float(eta)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *self.sample_shape))
        trajectory: list[tuple[str, np.ndarray]] = []
        snapshots: set[int] = set()
        if keep > 1:
            trajectory.append((f"t={self.timesteps}", x.astype("float32")))
            snapshots = {int(i) for i in np.linspace(0, len(steps) - 1, keep - 1).round()}
        for i, t in enumerate(steps):
            eps = self.guided_noise(x.astype("float32"), t, labels, scale, use_ema)
            noise = rng.standard_normal(x.shape)
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            if sampler == "ddpm":
                x = ddpm_step(self.noise_schedule, x, eps, t, noise, self.clip_denoised)
            else:
                x = ddim_step(
                    self.noise_schedule, x, eps, t, t_prev, eta, noise, self.clip_denoised
                )
            if i in snapshots:
                # x is now x_{t_prev} (paper numbering t_prev + 1); -1 means clean.
                label = f"t={t_prev + 1}" if t_prev >= 0 else "clean"
                trajectory.append((label, x.astype("float32")))
        return x.astype("float32"), trajectory

    def default_labels(self, n: int) -> np.ndarray | None:
        """Labels cycling through the classes (None for an unconditional model)."""
        return np.arange(n, dtype="int32") % self.num_classes if self.conditional else None

    def to_data(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Diffusion-space samples -> data space as NumPy, clipped to the value range."""
        out = grids.predict_batches(self.from_diffusion, np.asarray(x, dtype="float32"), batch)
        return np.clip(out, *self.value_range).astype("float32")

    def generate_samples(
        self, n: int, labels: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """``n`` samples in the data's value range, with the model's sampler settings and
        the EMA weights. A conditional model cycles through the classes when ``labels``
        is None. Generates in chunks of 256; deterministic for a given ``seed``."""
        if labels is None:
            labels = self.default_labels(n)
        elif self.conditional:
            labels = np.asarray(labels, dtype="int32").reshape(-1)
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} samples")
        chunk = 256
        out = []
        for i, start in enumerate(range(0, n, chunk)):
            part = None if labels is None else labels[start : start + chunk]
            count = min(chunk, n - start)
            x, _ = self.sample(count, part, seed=seed + 7919 * i)
            out.append(self.to_data(x))
        return np.concatenate(out) if out else np.zeros((0, *self.output_sample_shape()), "float32")

    def output_sample_shape(self) -> tuple[int, ...]:
        """Shape of one generated sample in data space."""
        return self.sample_shape

    # --- serialization --------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "timesteps": self.timesteps,
            "schedule": self.schedule,
            "num_classes": self.num_classes,
            "cond_drop": self.cond_drop,
            "ema_decay": self.ema_decay,
            "sampler": self.sampler,
            "sample_steps": self.sample_steps,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            "value_range": list(self.value_range),
            "clip_denoised": self.clip_denoised,
            "sample_every": self.sample_every,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        return cls(network, **config)


# --------------------------------------------------------------------------------------
# The registered builder
# --------------------------------------------------------------------------------------


def value_range_of(data: Any) -> tuple[float, float]:
    low, high = getattr(data, "value_range", (0.0, 1.0))
    return float(low), float(high)


def class_count(params: Any, data: Any, arch: str) -> int:
    """Number of classes to condition on: 0 unconditional. ``conditional: null`` means
    "when the data has class labels"."""
    labelled = bool(data.num_classes) and data.y.get("train") is not None
    wanted = params.conditional if params.conditional is not None else labelled
    if wanted and not labelled:
        raise ValueError(
            f"{arch}: conditional: true needs class labels, and the data has none; "
            "set conditional: false"
        )
    return int(data.num_classes) if wanted else 0


def sampling_options(params: Any) -> dict[str, Any]:
    """What :class:`DiffusionModel` takes from the params shared by both architectures."""
    return {
        "timesteps": params.timesteps,
        "schedule": params.schedule,
        "cond_drop": params.cond_drop,
        "ema_decay": params.ema_decay,
        "sampler": params.sampler,
        "sample_steps": params.sample_steps,
        "eta": params.eta,
        "guidance_scale": params.guidance_scale,
        "sample_every": params.sample_every,
        "seed": int(np.random.randint(1, 2**31 - 1)),
    }


def build(params: Any, data: Any) -> DiffusionModel:
    """The ``ddpm`` builder: a U-Net noise predictor on ``data``'s images."""
    shape = tuple(data.input_shape)
    if len(shape) != 3:
        raise ValueError(f"ddpm: needs images (height, width, channels), got input shape {shape}")
    widths = list(params.widths)
    if not widths:
        raise ValueError("ddpm: 'widths' must list at least one level")
    factor = 2 ** (len(widths) - 1)
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(
            f"ddpm: {len(widths)} U-Net levels need height and width divisible by {factor}, "
            f"got {shape[:2]}; use fewer 'widths' or resize the images (data param image_size)"
        )
    num_classes = class_count(params, data, "ddpm")
    network = build_unet(shape, widths, num_classes, params.blocks_per_level, params.emb_dim)
    model = DiffusionModel(
        network,
        num_classes=num_classes,
        value_range=value_range_of(data),
        clip_denoised=1.0,
        name="ddpm",
        **sampling_options(params),
    )
    model.build(None)
    return model


# --------------------------------------------------------------------------------------
# Sample grids (callback and plots) and the denoising trajectory
# --------------------------------------------------------------------------------------


def sample_grid(
    model: DiffusionModel, cols: int = 8, seed: int = 0
) -> tuple[np.ndarray, int, list[str] | None]:
    """``(images, cols, row_labels)``: one row per class (up to 10) for a conditional
    model, ``cols x cols`` samples otherwise; the same seed gives the same start noise."""
    if not model.conditional:
        return model.generate_samples(cols * cols, seed=seed), cols, None
    classes = min(model.num_classes, 10)
    labels = np.repeat(np.arange(classes, dtype="int32"), cols)
    images = model.generate_samples(len(labels), labels=labels, seed=seed)
    return images, cols, [str(c) for c in range(classes)]


def sample_grid_figure(
    model: DiffusionModel, title: str, class_names: Sequence[str] | None = None
) -> Any:
    images, cols, rows = sample_grid(model)
    if rows is not None and class_names:
        rows = [str(class_names[int(r)]) for r in rows]
    return grids.grid_figure(images, model.value_range, cols, title=title, row_labels=rows)


def trajectory_figure(model: DiffusionModel, n: int = 4, frames: int = 8, seed: int = 1) -> Any:
    """``n`` samples (rows) from pure noise to the result (columns), as ``x_t`` in data
    space; conditional models show one class per row with the model's guidance."""
    labels = model.default_labels(n)
    _, trajectory = model.sample(n, labels, seed=seed, keep=frames)
    fig = grids.figure(1.0 * len(trajectory) + 0.6, 1.0 * n + 0.6)
    axes = fig.subplots(n, len(trajectory), squeeze=False)
    for col, (label, x) in enumerate(trajectory):
        shown = grids.to_display(model.to_data(x), model.value_range)
        for row in range(n):
            grids.show(axes[row, col], shown[row])
        axes[0, col].set_title(label, fontsize=8)
    if labels is not None:
        for row in range(n):
            axes[row, 0].set_axis_on()
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
            axes[row, 0].set_ylabel(f"class {labels[row]}", fontsize=8)
    fig.suptitle(f"denoising trajectory ({model.sampler})", fontsize=9)
    return fig


class SampleGrid(keras.callbacks.Callback):
    """Logs a sample grid (EMA weights, fixed seed) every ``every`` epochs as
    ``samples/samples_epoch_NNN.png``."""

    def __init__(self, context: Any, every: int, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.context = context
        self.every = int(every)
        self.class_names = list(class_names or [])

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        done = epoch + 1
        if self.every > 0 and done % self.every == 0:
            fig = sample_grid_figure(self.model, f"epoch {done}", self.class_names)
            self.context.log_figure(fig, f"samples_epoch_{done:03d}.png", "samples")


def callbacks(context: Any, model: DiffusionModel, data: Any) -> list[Any]:
    """The registered callback hook: a :class:`SampleGrid` for image data."""
    if not data.is_image or model.sample_every <= 0:
        return []
    return [SampleGrid(context, model.sample_every, data.class_names)]


def plots(context: Any, model: DiffusionModel, data: Any) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``samples.png`` (the final grid, one row per class when
    conditional) and ``trajectory.png`` (x_t along the reverse process), image data only."""
    if not data.is_image:
        return
    title = "samples by class" if model.conditional else "samples"
    yield "samples.png", sample_grid_figure(model, f"{title} ({model.sampler})", data.class_names)
    yield "trajectory.png", trajectory_figure(model)
