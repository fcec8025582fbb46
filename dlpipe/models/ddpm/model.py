"""Denoising diffusion (DDPM, DDIM) with classifier-free guidance, for the ``ddpm`` architecture.

A network ``eps_theta(x_t, t)`` learns to predict the noise added to an image by the
forward process, and sampling runs that process backwards from pure noise; the
schedules, the forward process and the samplers' update rules are in
:mod:`dlpipe.models.ddpm.schedule`, the noise-predicting U-Net in
:mod:`dlpipe.models.ddpm.unet`.

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
overrides those two to diffuse in an autoencoder's latent space. The figures are in
:mod:`dlpipe.models.ddpm.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.errors import ConfigError
from dlpipe.models import grids
from dlpipe.models.common import apply_gradients, make_loss_weights, replica_scaled
from dlpipe.models.ddpm import DDPMParams, DiffusionCommonParams
from dlpipe.models.ddpm.schedule import (
    SAMPLERS,
    NoiseSchedule,
    ddim_step,
    ddpm_step,
    q_sample,
    sampling_timesteps,
)
from dlpipe.models.ddpm.unet import build_unet
from dlpipe.models.grids import value_range_of

LOSS_TERMS = ("noise",)

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
        low, high = self.value_range
        return np.clip(out, low, high).astype("float32")

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


def class_count(params: DiffusionCommonParams, data: DataBundle, arch: str) -> int:
    """Number of classes to condition on: 0 unconditional. ``conditional: null`` means
    "when the data has class labels"."""
    labelled = bool(data.num_classes) and data.y.get("train") is not None
    wanted = params.conditional if params.conditional is not None else labelled
    if wanted and not labelled:
        raise ConfigError(
            f"{arch}: conditional: true needs class labels, and the data has none; "
            "set conditional: false"
        )
    return int(data.num_classes or 0) if wanted else 0


def sampling_options(params: DiffusionCommonParams) -> dict[str, Any]:
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


def build(params: DDPMParams, data: DataBundle) -> DiffusionModel:
    """The ``ddpm`` builder: a U-Net noise predictor on ``data``'s images."""
    shape = tuple(data.input_shape)
    if len(shape) != 3:
        raise ConfigError(f"ddpm: needs images (height, width, channels), got input shape {shape}")
    widths = list(params.widths)
    if not widths:
        raise ConfigError("ddpm: 'widths' must list at least one level")
    factor = 2 ** (len(widths) - 1)
    if shape[0] % factor or shape[1] % factor:
        raise ConfigError(
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
# Sample grids during training (the figures after it are in dlpipe.models.ddpm.plots)
# --------------------------------------------------------------------------------------


def sample_grid(model: DiffusionModel, cols: int = 8, seed: int = 0) -> grids.SampleSet:
    """``(images, cols, row_labels)``: one row per class (up to 10) for a conditional
    model, ``cols x cols`` samples otherwise; the same seed gives the same start noise."""
    if not model.conditional:
        return model.generate_samples(cols * cols, seed=seed), cols, None
    classes = min(model.num_classes, 10)
    labels = np.repeat(np.arange(classes, dtype="int32"), cols)
    images = model.generate_samples(len(labels), labels=labels, seed=seed)
    return images, cols, [str(c) for c in range(classes)]


def callbacks(context: Any, model: DiffusionModel, data: DataBundle) -> list[Any]:
    """The registered callback hook: a sample grid (EMA weights, fixed seed) every
    ``sample_every`` epochs, one row per class when conditional (image data only)."""
    if not data.is_image or model.sample_every <= 0:
        return []
    names = list(data.class_names or [])
    return [
        grids.sample_grid_callback(
            context,
            model.sample_every,
            lambda: grids.named_rows(sample_grid(model), names),
            model.value_range,
        )
    ]
