"""DDPM/DDIM and latent diffusion (dlpipe.models.ddpm.model, dlpipe.models.latent_diffusion.model):
the forward process, schedules, time embedding, samplers, guidance and EMA on tiny
models, then short pipeline runs through the CLI (one stage feeding another, and a
source model taken from an earlier MLflow run)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.models.ddpm import DDPMParams  # noqa: E402
from dlpipe.models.ddpm import model as diffusion  # noqa: E402
from dlpipe.models.ddpm import schedule as ddpm_schedule  # noqa: E402
from dlpipe.models.ddpm import unet as ddpm_unet  # noqa: E402
from dlpipe.models.ddpm.schedule import NoiseSchedule  # noqa: E402
from dlpipe.models.latent_diffusion import LatentDiffusionParams, SourceModel  # noqa: E402
from dlpipe.models.latent_diffusion import model as latent_diffusion  # noqa: E402

TINY = {"widths": [8], "timesteps": 30, "sample_steps": 5, "sample_every": 0}


def make_data(shape=(8, 8, 1), n=32, value_range=(-1.0, 1.0), classes=3, seed=0) -> DataBundle:
    rng = np.random.default_rng(seed)
    low, high = value_range
    x = {
        s: (low + (high - low) * rng.random((n, *shape))).astype("float32")
        for s in ("train", "val", "test")
    }
    y = {s: rng.integers(0, classes, n).astype("int32") for s in ("train", "val", "test")}
    return DataBundle(
        x=x,
        y=y,
        task="classification",
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
        value_range=value_range,
        name="synthetic",
    )


def digits(value_range=(-1.0, 1.0)) -> np.ndarray:
    """All 1,797 embedded 8x8 digits, scaled to ``value_range``."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype("float32")[..., None] / 16.0
    low, high = value_range
    return low + (high - low) * x


def tiny_ddpm(conditional=True, **overrides) -> diffusion.DiffusionModel:
    """A tiny U-Net whose (zero-initialized) output layer and label embedding are
    randomized, so that it predicts non-zero noise that clearly depends on the label."""
    keras.utils.set_random_seed(0)
    params = DDPMParams(**{**TINY, "conditional": conditional, **overrides})
    model = diffusion.build(params, make_data())
    out = model.network.get_layer("noise")
    kernel, bias = out.get_weights()
    rng = np.random.default_rng(1)
    out.set_weights([rng.normal(0, 0.3, kernel.shape).astype("float32"), bias])
    if model.conditional:
        table = model.network.get_layer("label_embedding")
        table.set_weights(
            [rng.normal(0, 1.0, w.shape).astype("float32") for w in table.get_weights()]
        )
    model.ema_network.set_weights(model.network.get_weights())
    return model


def as_np(value):
    return keras.ops.convert_to_numpy(value)


# --------------------------------------------------------------------------------------
# Forward process and schedules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_process_at_the_last_step_is_standard_normal(kind):
    schedule = NoiseSchedule(kind, 1000)
    x0 = np.tile(digits(), (4, 1, 1, 1))  # 7,188 real images in [-1, 1]
    assert abs(x0.mean()) > 0.3 and x0.std() > 0.5  # far from N(0, 1) to begin with
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(x0.shape).astype("float32")
    last = np.full(len(x0), 999)
    x_T = as_np(ddpm_schedule.q_sample(schedule, x0, last, noise))
    assert x_T.mean() == pytest.approx(0.0, abs=0.01)
    assert x_T.var() == pytest.approx(1.0, abs=0.01)
    # ... and independent of the image: the signal is gone
    assert abs(np.corrcoef(x0.ravel(), x_T.ravel())[0, 1]) < 0.02
    # at the first step the sample is still (almost) the image
    x_1 = as_np(ddpm_schedule.q_sample(schedule, x0, np.zeros(len(x0)), noise))
    assert np.corrcoef(x0.ravel(), x_1.ravel())[0, 1] > 0.99
    # per-example timesteps: each row uses its own alpha_bar
    t = np.array([0, 500, 999])
    x_t = as_np(ddpm_schedule.q_sample(schedule, x0[:3], t, noise[:3]))
    ab = schedule.alpha_bars[t].reshape(3, 1, 1, 1)
    np.testing.assert_allclose(
        x_t, np.sqrt(ab) * x0[:3] + np.sqrt(1 - ab) * noise[:3], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [50, 200, 1000])
def test_schedules_are_monotone_with_alpha_bar_in_the_unit_interval(kind, timesteps):
    s = NoiseSchedule(kind, timesteps)
    assert s.betas.shape == s.alpha_bars.shape == (timesteps,)
    assert np.all((s.betas > 0) & (s.betas < 1))
    assert np.all((s.alpha_bars > 0) & (s.alpha_bars < 1))
    assert np.all(np.diff(s.alpha_bars) < 0)  # strictly more noise at every step
    np.testing.assert_allclose(s.alpha_bars, np.cumprod(1 - s.betas))
    assert s.alpha_bars[0] > 0.97 and s.alpha_bars[-1] < 1e-3
    if kind == "linear":
        assert np.all(np.diff(s.betas) > 0)
        assert s.betas[-1] == pytest.approx(0.02 * 1000 / timesteps)
    else:  # cosine: alpha_bar(t) = f(t) / f(0) where betas are not clipped
        t = np.arange(1, timesteps + 1)
        f = np.cos((t / timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
        f0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
        np.testing.assert_allclose(s.alpha_bars[: timesteps // 2], (f / f0)[: timesteps // 2])
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule("quadratic", 10)


def test_sinusoidal_time_embedding_values():
    t = np.array([[0], [1], [7]], dtype="int32")
    emb = as_np(ddpm_unet.SinusoidalEmbedding(8)(t))
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    freqs = 10000.0 ** (-np.arange(4) / 4)  # 1, 0.1, 0.01, 0.001
    np.testing.assert_allclose(freqs, [1, 0.1, 0.01, 0.001])
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(freqs), np.cos(freqs)]), rtol=1e-5)
    np.testing.assert_allclose(emb[2, 0], np.sin(7.0), rtol=1e-5)
    np.testing.assert_allclose(emb[2, 4], np.cos(7.0), rtol=1e-5)
    assert np.all(np.abs(emb) <= 1.0)
    with pytest.raises(ValueError, match="even"):
        ddpm_unet.SinusoidalEmbedding(5)


# --------------------------------------------------------------------------------------
# Samplers, guidance, label dropping, EMA
# --------------------------------------------------------------------------------------


def test_ddim_with_every_step_and_eta_1_is_ddpm_step_by_step():
    s = NoiseSchedule("linear", 40)
    rng = np.random.default_rng(3)
    x_t = rng.standard_normal((6, 5))
    eps = rng.standard_normal((6, 5))
    noise = rng.standard_normal((6, 5))
    for t in (39, 20, 1, 0):
        for clip in (None, 1.0):
            a = ddpm_schedule.ddpm_step(s, x_t, eps, t, noise, clip)
            b = ddpm_schedule.ddim_step(s, x_t, eps, t, t - 1, 1.0, noise, clip)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # eta = 0 is deterministic; the last step returns the x0 estimate itself
    assert np.allclose(
        ddpm_schedule.ddim_step(s, x_t, eps, 5, 2, 0.0, noise),
        ddpm_schedule.ddim_step(s, x_t, eps, 5, 2, 0.0, -noise),
    )
    x0 = ddpm_schedule.predict_x0(x_t, eps, s.alpha_bars[3], None)
    np.testing.assert_allclose(ddpm_schedule.ddim_step(s, x_t, eps, 3, -1, 0.0, noise, None), x0)
    assert ddpm_schedule.sampling_timesteps("ddim", 1000, 5) == [999, 749, 500, 250, 0]
    assert ddpm_schedule.sampling_timesteps("ddpm", 4, 2) == [3, 2, 1, 0]


def test_samplers_agree_and_produce_images_in_the_data_range():
    model = tiny_ddpm()
    labels = np.array([0, 1, 2, 0])
    ddpm, _ = model.sample(4, labels, seed=5, sampler="ddpm")
    ddim, _ = model.sample(4, labels, seed=5, sampler="ddim", sample_steps=30, eta=1.0)
    assert ddpm.shape == (4, 8, 8, 1) and np.all(np.isfinite(ddpm))
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)  # same noise, same process
    fast, trajectory = model.sample(4, labels, seed=5, sampler="ddim", sample_steps=5, keep=4)
    assert fast.shape == (4, 8, 8, 1) and np.all(np.isfinite(fast))
    assert [label for label, _ in trajectory] == ["t=30", "t=23", "t=8", "clean"]
    np.testing.assert_allclose(trajectory[-1][1], fast)
    images = model.generate_samples(5, seed=1)  # labels cycle through the classes
    assert images.shape == (5, 8, 8, 1) and images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_allclose(model.generate_samples(5, seed=1), images)  # seeded
    assert not np.allclose(model.generate_samples(5, seed=2), images)
    with pytest.raises(ValueError, match="labels"):
        model.generate_samples(3, labels=np.array([0, 1]))


def test_guidance_0_is_unconditional_and_1_is_conditional():
    model = tiny_ddpm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 1)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    uncond = model.predict_noise(x, 10, None)  # the null label
    cond = model.predict_noise(x, 10, labels)
    assert not np.allclose(uncond, cond, atol=1e-4)  # the label matters
    np.testing.assert_allclose(model.guided_noise(x, 10, labels, 0.0), uncond, atol=1e-5)
    np.testing.assert_allclose(model.guided_noise(x, 10, labels, 1.0), cond, atol=1e-5)
    np.testing.assert_allclose(
        model.guided_noise(x, 10, labels, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-4
    )
    # an unconditional model has no label input at all
    plain = tiny_ddpm(conditional=False)
    assert len(plain.network.inputs) == 2 and not plain.conditional
    np.testing.assert_allclose(
        plain.guided_noise(x, 10, labels, 3.0), plain.predict_noise(x, 10), atol=1e-6
    )


def test_labels_are_dropped_to_the_null_class_with_cond_drop():
    model = tiny_ddpm()
    labels = keras.ops.convert_to_tensor(np.arange(6000).reshape(-1, 1) % 3, dtype="int32")
    assert np.all(as_np(model.drop_labels(labels, 0.0)) == as_np(labels))
    dropped = as_np(model.drop_labels(labels, 0.25))
    null = dropped == model.num_classes
    assert null.mean() == pytest.approx(0.25, abs=0.03)
    assert np.all(dropped[~null] == as_np(labels)[~null])


def test_ema_moves_toward_the_weights():
    model = tiny_ddpm()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert float(as_np(model.ema_decay_now())) == pytest.approx(0.1)  # warm-up at step 0
    rng = np.random.default_rng(2)
    model.network.set_weights(
        [w + rng.normal(0, 0.1, w.shape) for w in model.network.get_weights()]
    )
    before = [w.copy() for w in model.ema_network.get_weights()]
    target = model.network.get_weights()
    model.update_ema(0.9)
    after = model.ema_network.get_weights()
    for b, a, w in zip(before, after, target, strict=True):
        np.testing.assert_allclose(a, 0.9 * b + 0.1 * w, rtol=1e-5, atol=1e-6)
    dist = [
        np.linalg.norm(a - w) / max(np.linalg.norm(b - w), 1e-12)
        for b, a, w in zip(before, after, target, strict=True)
        if np.linalg.norm(b - w) > 0
    ]
    assert dist and np.allclose(dist, 0.9, atol=1e-3)


def test_build_checks_shapes_and_labels():
    with pytest.raises(ValueError, match="divisible by 4"):
        diffusion.build(DDPMParams(widths=[4, 4, 4]), make_data((6, 6, 1), n=4))
    unlabeled = make_data(n=4)
    unlabeled.num_classes = None
    with pytest.raises(ValueError, match="class labels"):
        diffusion.build(DDPMParams(**TINY, conditional=True), unlabeled)
    assert not diffusion.build(DDPMParams(**TINY), unlabeled).conditional  # null: auto
    with pytest.raises(ValueError, match="exactly one"):
        SourceModel(stage="vae", run_id="abc")
    with pytest.raises(ValueError, match="exactly one"):
        LatentDiffusionParams(autoencoder={})


def test_latent_diffusion_standardizes_latents_and_decodes_samples(tmp_path):
    keras.utils.set_random_seed(0)
    data = make_data(value_range=(0.0, 1.0))
    params = LatentDiffusionParams(width=16, depth=1, timesteps=20, sample_steps=4, sample_every=0)
    model = latent_diffusion.build(params, data, None)  # no context: a fresh autoencoder
    z = as_np(model.to_diffusion(data.x["train"]))
    assert z.shape == (32, 4)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-3)
    # the encoder and decoder are frozen: only the denoiser trains
    assert len(model.trainable_variables) == len(model.network.trainable_variables) > 0
    images = model.generate_samples(6, seed=0)
    assert images.shape == (6, 8, 8, 1) and images.min() >= 0.0 and images.max() <= 1.0
    path = tmp_path / "ld.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, latent_diffusion.LatentDiffusion)
    np.testing.assert_allclose(loaded.generate_samples(6, seed=0), images, atol=1e-5)


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


def _only_run(client, experiment: str, name: str | None = None):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    if name is not None:
        runs = [r for r in runs if r.info.run_name == name]
    (run,) = runs
    assert run.info.status == "FINISHED"
    return run


def _artifacts(client, run_id: str, folder: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


@pytest.mark.slow
def test_ddpm_pipeline_logs_loss_samples_trajectory_and_a_loadable_model(workdir, repo):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "ddpm.yaml"),
            "--set", "data.limit=256",
            "--set", "model.widths=[8, 8]",
            "--set", "model.timesteps=50",
            "--set", "model.sample_steps=4",
            "--set", "model.sample_every=2",
            "--set", "train.epochs=2",
        ]
    )  # fmt: skip
    assert rc == 0
    client = MlflowClient(default_tracking_uri())
    run = _only_run(client, "dlpipe-diffusion")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1]
    assert all(0.0 < m.value < 2.0 for m in history)
    assert "test_loss" in run.data.metrics
    assert _artifacts(client, run.info.run_id, "samples") == {"samples/samples_epoch_002.png"}
    assert {"plots/samples.png", "plots/trajectory.png"} <= _artifacts(
        client, run.info.run_id, "plots"
    )
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, diffusion.DiffusionModel) and model.conditional
    assert model.num_classes == 10 and model.sampler == "ddim"
    images = model.generate_samples(10, seed=0)
    assert images.shape == (10, 16, 16, 1) and images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.slow
def test_latent_diffusion_uses_an_earlier_stage_and_a_previous_run(workdir, repo):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    tiny = [
        "--set", "data.limit=240",
        "--set", "vae.hidden=[32]",
        "--set", "vae.latent_dim=4",
        "--set", "train_vae.epochs=1",
        "--set", "diffusion.width=16",
        "--set", "diffusion.depth=1",
        "--set", "diffusion.timesteps=40",
        "--set", "diffusion.sample_steps=4",
        "--set", "diffusion.sample_every=1",
        "--set", "train_diffusion.epochs=1",
    ]  # fmt: skip
    # 1) VAE and latent diffusion in one pipeline: the diffusion stage finds the VAE
    #    by its stage name.
    assert main(["run", str(repo / "pipelines" / "latent_diffusion.yaml"), *tiny]) == 0
    client = MlflowClient(default_tracking_uri())
    run = _only_run(client, "dlpipe-diffusion")
    metrics = client.get_metric_history
    # Two train stages in one run: each one's epoch metrics carry its stage id.
    assert len(metrics(run.info.run_id, "train_vae/kl_loss")) == 1
    assert len(metrics(run.info.run_id, "train_vae/loss")) == 1
    assert len(metrics(run.info.run_id, "train_diffusion/loss")) == 1
    assert not metrics(run.info.run_id, "loss")
    assert "samples/samples_epoch_001.png" in _artifacts(client, run.info.run_id, "samples")
    assert {"plots/samples.png", "plots/trajectory.png"} <= _artifacts(
        client, run.info.run_id, "plots"
    )
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, latent_diffusion.LatentDiffusion) and model.sample_shape == (4,)
    images = model.generate_samples(4, seed=0)
    assert images.shape == (4, 16, 16, 1) and images.min() >= 0.0 and images.max() <= 1.0

    # 2) A second pipeline takes an autoencoder from the MLflow run that trained it.
    (workdir / "ae.yaml").write_text(
        "name: ae\nexperiment: dlpipe-diffusion-src\nstages:\n"
        "  - {kind: data, use: sklearn_digits, params: {limit: 200, image_size: [16, 16]}}\n"
        "  - {kind: model, use: autoencoder, params: {hidden: [16], latent_dim: 3}}\n"
        "  - {kind: train, use: keras_fit, params: {epochs: 1, checkpoint: {enabled: false}}}\n"
    )
    assert main(["run", str(workdir / "ae.yaml")]) == 0
    source = _only_run(client, "dlpipe-diffusion-src")
    (workdir / "ld.yaml").write_text(
        "name: ld-from-run\nexperiment: dlpipe-diffusion-src\nstages:\n"
        "  - {kind: data, use: sklearn_digits, params: {limit: 200, image_size: [16, 16]}}\n"
        "  - kind: model\n    use: latent_diffusion\n    params:\n"
        f"      autoencoder: {{run_id: {source.info.run_id}}}\n"
        "      width: 16\n      depth: 1\n      timesteps: 40\n      sample_steps: 4\n"
        "      sample_every: 0\n"
        "  - {kind: train, use: keras_fit, params: {epochs: 1, checkpoint: {enabled: false}}}\n"
    )
    assert main(["run", str(workdir / "ld.yaml")]) == 0
    run = _only_run(client, "dlpipe-diffusion-src", "ld-from-run")
    assert len(metrics(run.info.run_id, "loss")) == 1
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir / "ld"))
    model = keras.saving.load_model(local)
    assert isinstance(model, latent_diffusion.LatentDiffusion) and model.sample_shape == (3,)
    # the encoder is the source run's: its weights match the logged autoencoder's
    ae_path = client.download_artifacts(
        source.info.run_id, "model/model.keras", str(workdir / "ae")
    )
    ae = keras.saving.load_model(ae_path)
    for a, b in zip(ae.encoder.get_weights(), model.encoder.get_weights(), strict=True):
        np.testing.assert_allclose(a, b)
