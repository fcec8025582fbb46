"""VAE variants (dlpipe.models.vae.model, dlpipe.models.cvae.model): the reparameterization
gradient, KL warm-up, latent traversals, sampling by class, saving, and a short
conditional-VAE pipeline run through the CLI. Tiny synthetic data, CPU only."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.models.common import set_loss_weights  # noqa: E402
from dlpipe.models.cvae import CVAEParams  # noqa: E402
from dlpipe.models.cvae import model as cvae  # noqa: E402
from dlpipe.models.cvae import plots as cvae_plots  # noqa: E402
from dlpipe.models.vae import VAEParams  # noqa: E402
from dlpipe.models.vae import model as vae  # noqa: E402
from dlpipe.models.vae import plots as vae_plots  # noqa: E402

TINY = {"hidden": [16, 8], "latent_dim": 3}


def make_data(shape=(8, 8, 1), n=48, num_classes=3, seed=0) -> DataBundle:
    """Noisy class-dependent images: class ``c`` lights up band ``c`` of the rows."""
    rng = np.random.default_rng(seed)
    x, y = {}, {}
    for split in ("train", "val", "test"):
        labels = rng.integers(0, num_classes, n).astype("int32")
        images = 0.2 * rng.random((n, *shape))
        if len(shape) == 3:
            band = shape[0] // num_classes
            for i, c in enumerate(labels):
                images[i, c * band : (c + 1) * band] += 0.7
        x[split] = np.clip(images, 0, 1).astype("float32")
        y[split] = labels
    return DataBundle(
        x=x,
        y=y,
        task="classification",
        num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)],
        name="synthetic",
    )


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return make_data()


def compiled(builder, params, data, seed=0):
    keras.utils.set_random_seed(seed)
    model = builder(params, data)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    return model


def as_np(value):
    return keras.ops.convert_to_numpy(value)


# --------------------------------------------------------------------------------------
# The reparameterization trick: gradients reach the encoder through the sample
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [False, True], ids=["vae", "cvae"])
def test_reparameterization_gradient_flows_to_mean_log_var_and_encoder(conditional, data):
    builder, params = (
        (cvae.build, CVAEParams(**TINY)) if conditional else (vae.build, VAEParams(**TINY))
    )
    model = compiled(builder, params, data)
    x, labels = data.x["train"][:16], data.y["train"][:16]

    # d(sum z)/d(mean) = 1 and d(sum z)/d(log_var) = (z - mean) / 2 = exp(log_var/2) eps / 2
    with tf.GradientTape() as tape:
        z_mean, z_log_var = model.encode(x, labels, training=True)
        z = model.sampler((z_mean, z_log_var))
        loss = tf.reduce_sum(z)
    g_mean, g_log_var = tape.gradient(loss, [z_mean, z_log_var])
    np.testing.assert_allclose(as_np(g_mean), 1.0)
    expected = 0.5 * (as_np(z) - as_np(z_mean))
    np.testing.assert_allclose(as_np(g_log_var), expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(as_np(g_log_var))) and np.abs(as_np(g_log_var)).sum() > 0

    # With the KL term off, the log-variance head is reached ONLY through the sample
    # (the reparameterized noise): its gradient must still be non-zero and finite.
    set_loss_weights(model, {"kl": 0.0})
    log_var_head = model.encoder.get_layer("z_log_var").trainable_variables
    mean_head = model.encoder.get_layer("z_mean").trainable_variables
    first = model.encoder.trainable_variables[0]  # the first layer of the trunk
    with tf.GradientTape() as tape:
        total, terms = model.loss_terms(x, labels, training=True)
    grads = tape.gradient(total, [*log_var_head, *mean_head, first])
    for grad in grads:
        assert grad is not None
        values = as_np(grad)
        assert np.all(np.isfinite(values)) and np.abs(values).sum() > 0
    assert float(as_np(total)) == pytest.approx(float(as_np(terms["reconstruction"])))


# --------------------------------------------------------------------------------------
# KL warm-up
# --------------------------------------------------------------------------------------


def test_kl_warmup_schedule_is_linear_from_zero_to_the_target():
    warm = vae.KLWarmUp(target=4.0, epochs=4)
    assert [warm.weight_at(e) for e in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="epochs"):
        vae.KLWarmUp(1.0, 0)


@pytest.mark.parametrize("conditional", [False, True], ids=["vae", "cvae"])
def test_kl_warmup_callback_sets_the_weight_each_epoch(conditional, data):
    builder, cls = (cvae.build, CVAEParams) if conditional else (vae.build, VAEParams)
    model = compiled(builder, cls(**TINY, kl_warmup_epochs=4), data)
    # As the train stage does: set loss_weights, then ask the hook for callbacks.
    set_loss_weights(model, {"kl": 2.0})
    callbacks = (cvae.callbacks if conditional else vae.callbacks)(None, model, data)
    assert [type(cb) for cb in callbacks] == [vae.KLWarmUp]
    epochs = 5 if conditional else 2  # the VAE stops during the warm-up
    history = model.fit(
        data.dataset("train", 16),
        validation_data=data.dataset("val", 16),
        epochs=epochs,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,
    ).history
    np.testing.assert_allclose(history["kl_weight"], [0.0, 0.5, 1.0, 1.5, 2.0][:epochs])
    assert "val_kl_weight" not in history and len(history["val_kl_loss"]) == epochs
    # The logged loss used the weight in use: epoch 1 is the reconstruction alone.
    assert history["loss"][0] == pytest.approx(history["reconstruction_loss"][0], rel=1e-5)
    # After training (even one stopped during the warm-up) the weight is the target,
    # so evaluation and the saved model use the configured value.
    assert float(as_np(model.loss_weights["kl"])) == 2.0


# --------------------------------------------------------------------------------------
# Latent traversal
# --------------------------------------------------------------------------------------


def test_traversal_latents_vary_one_dimension_per_row():
    values = np.linspace(-3, 3, 5, dtype="float32")
    z = vae_plots.traversal_latents(6, [4, 1], values).reshape(2, 5, 6)
    np.testing.assert_array_equal(z[0, :, 4], values)
    np.testing.assert_array_equal(z[1, :, 1], values)
    assert np.count_nonzero(z[0][:, [0, 1, 2, 3, 5]]) == 0
    assert np.count_nonzero(z[1][:, [0, 2, 3, 4, 5]]) == 0


def test_traversal_rows_are_the_most_used_dimensions(data):
    model = compiled(vae.build, VAEParams(hidden=[16, 8], latent_dim=10), data)
    kl = vae_plots.latent_activity(model, data.x["test"])
    assert kl.shape == (10,) and np.all(kl >= 0)
    fig = vae_plots.plot_latent_traversal(model, data.x["test"], steps=5)
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 8  # at most 8 rows
    shown = [int(text.split("]")[0][2:]) for text in labels]
    assert shown == [int(d) for d in np.argsort(-kl)[:8]]


# --------------------------------------------------------------------------------------
# The conditional VAE
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cvae_fit(data):
    model = compiled(cvae.build, CVAEParams(hidden=[32, 16], latent_dim=2), data)
    ds = data.dataset("train", 16, shuffle=True)
    return model, model.fit(ds, epochs=3, verbose=0, shuffle=False).history


@pytest.fixture(scope="module")
def trained_cvae(cvae_fit):
    return cvae_fit[0]


def test_no_warmup_means_no_callback_and_no_kl_weight_metric(cvae_fit, data):
    model, history = cvae_fit
    assert cvae.callbacks(None, model, data) == []
    assert "kl_weight" not in history  # pipelines without warm-up report as before
    assert history["loss"][-1] < history["loss"][0]


def test_cvae_samples_by_chosen_class(trained_cvae):
    model = trained_cvae
    assert model.conditional  # the sample_quality stage asks for balanced labels then
    images = model.generate_samples(6, labels=np.full(6, 2), seed=1)
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, model.generate_samples(6, np.full(6, 2), seed=1))
    assert not np.allclose(images, model.generate_samples(6, np.full(6, 2), seed=2))
    # The label controls the image: the same z as class 0 and as class 2 differ, and
    # each lights up its own band of rows (as the training data do).
    as_0 = model.generate_samples(6, labels=np.zeros(6, "int32"), seed=1)
    assert as_0[:, :2].mean() > images[:, :2].mean()
    assert images[:, 4:6].mean() > as_0[:, 4:6].mean()
    # one label for all, one-hot labels, and cycling through the classes by default
    np.testing.assert_array_equal(model.generate_samples(6, np.array([2]), seed=1), images)
    np.testing.assert_array_equal(model.generate_samples(6, np.eye(3)[[2] * 6], seed=1), images)
    cycled = model.generate_samples(6, seed=1)
    np.testing.assert_array_equal(cycled[2], images[2])
    np.testing.assert_array_equal(cycled[0], as_0[0])
    with pytest.raises(ValueError, match="labels"):
        model.generate_samples(4, labels=np.arange(3))
    with pytest.raises(ValueError, match="class ids"):
        model.generate_samples(2, labels=np.array([0, 3]))


def test_cvae_grid_has_one_row_per_class_with_shared_z_per_column(trained_cvae):
    images = cvae.samples_by_class(trained_cvae, cols=4)
    assert images.shape == (3 * 4, 8, 8, 1)
    z = np.random.default_rng(0).standard_normal((4, 2)).astype("float32")
    expected = as_np(trained_cvae.decode(z, np.full(4, 1)))
    np.testing.assert_allclose(images[4:8], expected, rtol=1e-5, atol=1e-6)


def test_cvae_plots(trained_cvae, data):
    figures = dict(cvae_plots.plots(None, trained_cvae, data))
    assert set(figures) == {
        "reconstructions.png",
        "samples_by_class.png",
        "latent_scatter.png",
        "latent_traversal.png",
    }
    rows = [t.get_text() for t in figures["samples_by_class.png"].axes[0].get_yticklabels()]
    assert rows == ["c0", "c1", "c2"]
    assert all(isinstance(f, Figure) and max(f.get_size_inches()) <= 8 for f in figures.values())


def test_cvae_needs_labels(data):
    unlabelled = make_data(n=8)
    unlabelled.num_classes = None
    with pytest.raises(ValueError, match="class labels"):
        cvae.build(CVAEParams(**TINY), unlabelled)
    model = compiled(cvae.build, CVAEParams(**TINY), data)
    with pytest.raises(ValueError, match="class labels"):
        model.fit(data.x["train"], epochs=1, verbose=0)


def test_cvae_saves_and_reloads(trained_cvae, data, tmp_path):
    model = trained_cvae
    path = tmp_path / "cvae.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, cvae.CVAE)
    assert loaded.num_classes == 3 and loaded.value_range == model.value_range
    x, y = data.x["test"][:8], data.y["test"][:8]
    np.testing.assert_allclose(as_np(loaded((x, y))), as_np(model((x, y))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        loaded.generate_samples(5, np.full(5, 1)), model.generate_samples(5, np.full(5, 1)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert np.isfinite(
        loaded.fit(data.dataset("train", 16), epochs=1, verbose=0, shuffle=False).history["loss"][0]
    )


def test_vae_generate_samples_clips_to_the_value_range(data):
    shifted = make_data(n=16)
    for split in shifted.x:
        shifted.x[split] = shifted.x[split] * 2 - 1
    shifted.value_range = (-1.0, 1.0)
    model = compiled(
        vae.build, VAEParams(**TINY, reconstruction="mse", kl_warmup_epochs=3), shifted
    )
    assert not model.conditional
    images = model.generate_samples(7, seed=3)
    assert images.shape == (7, 8, 8, 1) and images.min() >= -1.0 and images.max() <= 1.0
    loaded = vae.VAE.from_config(model.get_config())
    assert loaded.kl_warmup_epochs == 3 and loaded.value_range == (-1.0, 1.0)


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


def test_vae_variant_pipelines_validate(repo):
    from dlpipe.cli import main

    for name in ("cvae.yaml", "beta_vae.yaml", "vae.yaml"):
        assert main(["validate", str(repo / "pipelines" / name)]) == 0


@pytest.mark.slow
def test_cvae_pipeline_logs_metrics_grids_traversal_and_a_loadable_model(workdir, repo):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "cvae.yaml"),
            "--set", "train.epochs=2",
            "--set", "data.limit=300",
            "--set", "model.hidden=[8, 8]",
            "--set", "model.latent_dim=4",
            "--set", "model.sample_every=1",
            "--set", "model.kl_warmup_epochs=2",
            "--set", "train.loss_weights.kl=2",
        ]
    )  # fmt: skip
    assert rc == 0
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-vae")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    run_id = run.info.run_id
    for key in ("loss", "reconstruction_loss", "kl_loss", "val_loss"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [0, 1]
        assert all(np.isfinite(m.value) for m in history)
    warm = client.get_metric_history(run_id, "kl_weight")
    assert [(m.step, m.value) for m in warm] == [(0, 0.0), (1, 1.0)]
    assert {"test_loss", "test_reconstruction_loss", "test_kl_loss"} <= set(run.data.metrics)
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/samples_epoch_001.png", "samples/samples_epoch_002.png"} <= samples
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/samples_by_class.png", "plots/latent_traversal.png"} <= plots
    local = client.download_artifacts(run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, cvae.CVAE) and model.num_classes == 10
    assert float(as_np(model.loss_weights["kl"])) == 2.0
    images = model.generate_samples(10, labels=np.arange(10), seed=0)
    assert images.shape == (10, 16, 16, 1) and images.min() >= 0.0 and images.max() <= 1.0
