"""Autoencoder, GAN, conditional GAN and WGAN-GP (dlpipe.models.*): cheap numerical
checks on tiny synthetic data, plus one short pipeline run through the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.models.autoencoder import AutoencoderParams  # noqa: E402
from dlpipe.models.autoencoder import model as autoencoder  # noqa: E402
from dlpipe.models.autoencoder import plots as autoencoder_plots  # noqa: E402
from dlpipe.models.common import set_loss_weights  # noqa: E402
from dlpipe.models.gan import CGANParams, GANParams  # noqa: E402
from dlpipe.models.gan import model as gan  # noqa: E402
from dlpipe.models.gan import plots as gan_plots  # noqa: E402
from dlpipe.models.wgan_gp import WGANGPParams  # noqa: E402
from dlpipe.models.wgan_gp import model as wgan_gp  # noqa: E402

TINY = {"latent_dim": 4, "filters": [8, 4], "sample_every": 0}


def make_data(shape=(8, 8, 1), n=32, value_range=(-1.0, 1.0), seed=0) -> DataBundle:
    rng = np.random.default_rng(seed)
    low, high = value_range
    x = {
        s: (low + (high - low) * rng.random((n, *shape))).astype("float32")
        for s in ("train", "val", "test")
    }
    y = {s: rng.integers(0, 3, n).astype("int32") for s in ("train", "val", "test")}
    return DataBundle(
        x=x,
        y=y,
        task="classification",
        num_classes=3,
        class_names=["a", "b", "c"],
        value_range=value_range,
        name="synthetic",
    )


def compiled(builder, params, data, lr=1e-3):
    keras.utils.set_random_seed(0)
    model = builder(params, data)
    model.compile(optimizer=keras.optimizers.Adam(lr))
    return model


def as_np(value):
    return keras.ops.convert_to_numpy(value)


# --------------------------------------------------------------------------------------
# WGAN-GP: the gradient penalty
# --------------------------------------------------------------------------------------


def linear_critic(weight_norm: float, shape=(4, 4, 1), seed=0) -> keras.Model:
    """``f(x) = w . x + b``: its gradient is ``w`` everywhere, of norm ``weight_norm``."""
    critic = keras.Sequential([keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(1)])
    w = np.random.default_rng(seed).normal(size=(int(np.prod(shape)), 1))
    w *= weight_norm / np.linalg.norm(w)
    critic.layers[-1].set_weights([w.astype("float32"), np.array([0.7], dtype="float32")])
    return critic


def test_gradient_penalty_is_zero_for_a_1_lipschitz_linear_critic():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(16, 4, 4, 1)).astype("float32")
    fake = rng.normal(size=(16, 4, 4, 1)).astype("float32")
    gp = float(as_np(wgan_gp.gradient_penalty(linear_critic(1.0), real, fake, seed=3)))
    assert gp == pytest.approx(0.0, abs=1e-8)
    # gradient norm 3 everywhere: (3 - 1)^2 = 4, whatever the interpolation
    gp = float(as_np(wgan_gp.gradient_penalty(linear_critic(3.0), real, fake, seed=3)))
    assert gp == pytest.approx(4.0, rel=1e-5)


def test_gradient_penalty_is_taken_at_the_interpolation():
    # f(x) = 0.5 ||x||^2 has gradient x, so the penalty is mean((||x_hat|| - 1)^2).
    rng = np.random.default_rng(2)
    real = rng.normal(size=(5, 3)).astype("float32")
    fake = rng.normal(size=(5, 3)).astype("float32")
    alpha = rng.random((5, 1)).astype("float32")

    def critic(x):
        return 0.5 * keras.ops.sum(keras.ops.square(x), axis=1, keepdims=True)

    gp = float(as_np(wgan_gp.gradient_penalty(critic, real, fake, alpha=alpha)))
    x_hat = real + alpha * (fake - real)
    expected = np.mean((np.linalg.norm(x_hat, axis=1) - 1.0) ** 2)
    assert gp == pytest.approx(expected, rel=1e-5)


def test_gp_weight_set_by_name_scales_the_penalty_in_the_critic_loss():
    data = make_data()
    model = compiled(wgan_gp.build, WGANGPParams(**TINY, critic_steps=1), data)
    assert set(model.loss_weights) == {"gp"}
    assert float(as_np(model.loss_weights["gp"])) == 10.0  # the paper's default
    real = data.x["train"][:8]
    for weight in (0.0, 2.5):
        set_loss_weights(model, {"gp": weight})  # what train.loss_weights.gp does
        d_loss, wasserstein, gp = (float(as_np(v)) for v in model.critic_loss(real))
        assert gp > 0
        assert d_loss == pytest.approx(-wasserstein + weight * gp, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="no loss term"):
        set_loss_weights(model, {"kl": 1.0})


def test_wgan_takes_critic_steps_per_generator_step():
    data = make_data()
    model = compiled(wgan_gp.build, WGANGPParams(**TINY, critic_steps=3), data)
    history = model.fit(data.x["train"], batch_size=16, epochs=1, verbose=0).history
    assert {"d_loss", "g_loss", "wasserstein", "gp"} <= set(history)
    assert int(as_np(model.optimizer.iterations)) == 2  # 32 examples, batches of 16
    assert int(as_np(model.d_optimizer.iterations)) == 6
    assert (model.optimizer.beta_1, model.optimizer.beta_2) == (0.5, 0.9)
    assert model.d_optimizer.beta_2 == 0.9


# --------------------------------------------------------------------------------------
# GAN: targets, two optimizers, conditioning
# --------------------------------------------------------------------------------------


def test_label_smoothing_and_noise_change_the_targets():
    targets = gan.discriminator_targets
    assert np.all(as_np(targets(True, 6)) == 1.0) and np.all(as_np(targets(False, 6)) == 0.0)
    smoothed = as_np(targets(True, 6, smoothing=0.1))
    assert smoothed.shape == (6, 1) and np.allclose(smoothed, 0.9)
    assert np.all(as_np(targets(False, 6, smoothing=0.1)) == 0.0)  # one-sided
    # flipping every target swaps them; smoothing then applies to the new "real" ones
    assert np.allclose(as_np(targets(True, 6, smoothing=0.1, flip_prob=1.0)), 0.0)
    assert np.allclose(as_np(targets(False, 6, smoothing=0.1, flip_prob=1.0)), 0.9)
    flipped = 1.0 - as_np(targets(True, 20000, flip_prob=0.2, seed=1))
    assert flipped.mean() == pytest.approx(0.2, abs=0.02)


def test_discriminator_loss_uses_the_configured_targets():
    data = make_data()
    params = GANParams(**TINY, label_smoothing=0.2, dropout=0.0)
    model = compiled(gan.build, params, data)
    # A discriminator that ignores its input and always answers logit b.
    logit = model.discriminator.get_layer("logit")
    b = 0.8
    kernel, bias = logit.get_weights()
    logit.set_weights([np.zeros_like(kernel), np.full_like(bias, b)])
    p = 1.0 / (1.0 + np.exp(-b))

    def bce(t):
        return -(t * np.log(p) + (1 - t) * np.log(1 - p))

    real = data.x["train"][:8]
    d_loss, _, _ = model.discriminator_loss(real, None, training=True)
    assert float(as_np(d_loss)) == pytest.approx(0.5 * (bce(0.8) + bce(0.0)), rel=1e-5)
    d_loss, _, _ = model.discriminator_loss(real, None, training=False)  # evaluation: hard
    assert float(as_np(d_loss)) == pytest.approx(0.5 * (bce(1.0) + bce(0.0)), rel=1e-5)


def test_gan_has_two_optimizers_and_alternates_updates():
    data = make_data()
    params = GANParams(**TINY, d_learning_rate=5e-4)
    model = compiled(gan.build, params, data, lr=2e-3)
    assert model.d_optimizer is not model.optimizer
    assert float(as_np(model.d_optimizer.learning_rate)) == pytest.approx(5e-4)
    assert float(as_np(model.optimizer.learning_rate)) == pytest.approx(2e-3)
    assert model.optimizer.beta_1 == model.d_optimizer.beta_1 == 0.5
    g_before = [as_np(v).copy() for v in model.generator.trainable_variables]
    d_before = [as_np(v).copy() for v in model.discriminator.trainable_variables]
    history = model.fit(data.dataset("train", 16), epochs=2, shuffle=False, verbose=0).history
    assert {"d_loss", "g_loss", "real_score", "fake_score"} <= set(history)
    assert all(np.isfinite(history["d_loss"] + history["g_loss"]))
    assert int(as_np(model.optimizer.iterations)) == int(as_np(model.d_optimizer.iterations)) == 4
    for before, var in zip(g_before, model.generator.trainable_variables, strict=True):
        assert not np.allclose(before, as_np(var))
    for before, var in zip(d_before, model.discriminator.trainable_variables, strict=True):
        assert not np.allclose(before, as_np(var))


def test_generator_output_range_follows_the_data():
    model = compiled(gan.build, GANParams(**TINY), make_data())
    out = model.predict(np.zeros((5, 8, 8, 1), "float32"), verbose=0)
    assert out.shape == (5, 8, 8, 1)
    assert model.generator.get_layer("image").activation.__name__ == "tanh"
    data01 = make_data(value_range=(0.0, 1.0))
    model = compiled(gan.build, GANParams(**TINY), data01)
    assert model.generator.get_layer("image").activation.__name__ == "sigmoid"
    with pytest.raises(ValueError, match="divisible by 8"):
        gan.build(GANParams(latent_dim=4, filters=[4, 4, 4]), make_data((12, 12, 1), n=4))


def test_conditional_gan_is_controlled_by_the_label():
    data = make_data()
    model = compiled(gan.build_conditional, CGANParams(**TINY), data)
    model.fit(data.dataset("train", 16), epochs=1, shuffle=False, verbose=0)
    z = model.fixed_latent(3)
    zeros = as_np(model.generate(z, np.zeros(3, "int32")))
    twos = as_np(model.generate(z, np.full(3, 2, "int32")))
    assert not np.allclose(zeros, twos)  # same noise, other class: other images
    np.testing.assert_allclose(as_np(model.generate(z, np.zeros(3, "int32"))), zeros)
    images, cols, rows = model.sample_grid(cols=4)
    assert images.shape == (3 * 4, 8, 8, 1) and cols == 4 and rows == ["0", "1", "2"]
    # unlabeled data cannot train a conditional GAN
    unlabeled = make_data(n=4)
    unlabeled.num_classes = None
    with pytest.raises(ValueError, match="class labels"):
        gan.build_conditional(CGANParams(**TINY), unlabeled)


class FakeContext:
    """Records what ``log_figure`` receives."""

    def __init__(self):
        self.logged = []

    def log_figure(self, figure, filename, artifact_path="plots"):
        assert isinstance(figure, Figure)
        self.logged.append((artifact_path, filename))


def test_sample_grid_callback_logs_fixed_noise_grids():
    data = make_data()
    model = compiled(gan.build, GANParams(**{**TINY, "sample_every": 2}), data)
    context = FakeContext()
    callbacks = gan.callbacks(context, model, data)
    assert len(callbacks) == 1
    first = model.sample_grid()[0]
    np.testing.assert_allclose(model.sample_grid()[0], first)  # fixed noise: same grid
    model.fit(data.dataset("train", 16), epochs=4, callbacks=callbacks, shuffle=False, verbose=0)
    assert context.logged == [
        ("samples", "samples_epoch_002.png"),
        ("samples", "samples_epoch_004.png"),
    ]
    assert not np.allclose(model.sample_grid()[0], first)  # training changed them
    assert dict(gan_plots.plots(None, model, data)).keys() == {"samples.png", "scores.png"}
    model.sample_every = 0
    assert gan.callbacks(context, model, data) == []


def test_gan_save_and_load_restore_both_optimizers(tmp_path):
    data = make_data()
    model = compiled(gan.build_conditional, CGANParams(**TINY, label_smoothing=0.1), data)
    model.fit(data.dataset("train", 16), epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "cgan.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, gan.GAN) and loaded.conditional and loaded.label_smoothing == 0.1
    z, labels = model.fixed_latent(4), np.arange(4) % 3
    np.testing.assert_allclose(
        as_np(loaded.generate(z, labels)), as_np(model.generate(z, labels)), atol=1e-6
    )
    for saved, restored in zip(model.d_optimizer.variables, loaded.d_optimizer.variables, strict=True):
        np.testing.assert_allclose(as_np(saved), as_np(restored))
    assert int(as_np(loaded.d_optimizer.iterations)) == 2
    history = loaded.fit(data.dataset("train", 16), epochs=1, shuffle=False, verbose=0).history
    assert np.isfinite(history["g_loss"][0])


# --------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        AutoencoderParams(hidden=[16, 8], latent_dim=3),
        AutoencoderParams(encoder="conv", hidden=[4, 8], latent_dim=2, noise_std=0.2),
    ],
    ids=["dense", "conv-denoising"],
)
def test_autoencoder_learns_and_keeps_shapes(params):
    data = make_data(value_range=(0.0, 1.0))
    model = compiled(autoencoder.build, params, data, lr=3e-3)
    history = model.fit(data.dataset("train", 16), epochs=4, shuffle=False, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    x = data.x["test"][:5]
    out = model.predict(x, verbose=0)
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0  # sigmoid
    # noise only while training: inference is deterministic
    np.testing.assert_allclose(as_np(model(x)), as_np(model(x)))
    noisy_differs = not np.allclose(as_np(model(x, training=True)), as_np(model(x)))
    assert noisy_differs == (params.noise_std > 0)


def test_autoencoder_loss_is_the_weighted_reconstruction_error():
    data = make_data(value_range=(0.0, 1.0))
    model = compiled(autoencoder.build, AutoencoderParams(hidden=[8], latent_dim=2), data)
    x = data.x["test"][:16]
    expected = np.mean(np.sum((model.predict(x, verbose=0) - x) ** 2, axis=(1, 2, 3)))
    result = model.evaluate(x, batch_size=16, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    set_loss_weights(model, {"reconstruction": 0.5})
    result = model.evaluate(x, batch_size=16, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(0.5 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="bce"):
        autoencoder.build(AutoencoderParams(reconstruction="bce"), make_data())


def test_autoencoder_plots_use_pca_for_wide_latents(tmp_path):
    data = make_data(value_range=(0.0, 1.0))
    model = compiled(autoencoder.build, AutoencoderParams(hidden=[8], latent_dim=3), data)
    figures = dict(autoencoder_plots.plots(None, model, data))
    assert set(figures) == {"reconstructions.png", "latent_scatter.png"}
    scatter = figures["latent_scatter.png"]
    assert scatter.axes[0].get_xlabel().startswith("PC 1")
    assert max(scatter.get_size_inches()) <= 8
    model.fit(data.x["train"][:16], epochs=1, verbose=0)  # builds the optimizer
    model.save(tmp_path / "ae.keras")
    loaded = keras.saving.load_model(tmp_path / "ae.keras")
    x = data.x["test"][:4]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gan_pipeline_logs_losses_sample_grids_and_a_loadable_model(workdir, repo, capsys):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "cgan.yaml"),
            "--set", "train.epochs=2",
            "--set", "data.limit=400",
            "--set", "model.filters=[8, 4]",
            "--set", "model.latent_dim=8",
            "--set", "model.sample_every=1",
            "--set", "train.loss_weights.generator=0.5",
            # cgan.yaml ends with sample_quality (tests/test_sample_quality.py): keep it small
            "--set", "quality.num_samples=100",
            "--set", "quality.classifier.epochs=1",
            "--set", "quality.classifier.filters=[8]",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "test_d_loss" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-gan")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss_weights.generator"] == "0.5"
    for key in ("d_loss", "g_loss", "real_score", "fake_score"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    assert {"test_d_loss", "test_g_loss", "quality_generated_label_accuracy"} <= set(
        run.data.metrics
    )
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/samples_epoch_001.png", "samples/samples_epoch_002.png"} <= samples
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/samples.png", "plots/scores.png"} <= plots
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, gan.GAN) and model.conditional
    assert float(as_np(model.loss_weights["generator"])) == 0.5
    images = as_np(model.generate(model.fixed_latent(10), np.arange(10)))
    assert images.shape == (10, 16, 16, 1) and images.min() >= -1.0 and images.max() <= 1.0
