"""The VAE model code (dlpipe.models.vae.model), on tiny synthetic images, CPU only."""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.models.common import make_loss_weights, replica_scaled, set_loss_weights  # noqa: E402
from dlpipe.models.vae import VAEParams  # noqa: E402
from dlpipe.models.vae import model as vae  # noqa: E402
from dlpipe.models.vae import plots as vae_plots  # noqa: E402

DENSE = VAEParams(hidden=[16, 8], latent_dim=2)
CONV = VAEParams(encoder="conv", hidden=[8, 16], latent_dim=2)


def make_data(shape=(8, 8, 1), n=64, seed=0) -> DataBundle:
    rng = np.random.default_rng(seed)
    x = {s: rng.random((n, *shape), dtype=np.float32) for s in ("train", "val", "test")}
    y = {s: rng.integers(0, 10, n) for s in ("train", "val", "test")}
    return DataBundle(x=x, y=y, task="unsupervised", num_classes=10, name="synthetic")


def build(params=DENSE, data=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = vae.build(params, data or make_data())
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return make_data()


@pytest.fixture(scope="module")
def trained(data) -> tuple[keras.Model, dict]:
    model = build(DENSE, data)
    history = model.fit(
        data.x["train"],
        validation_data=(data.x["val"], data.y["val"]),
        epochs=2,
        batch_size=16,
        verbose=0,
    )
    return model, history.history


def test_fit_reports_loss_terms(trained):
    _, history = trained
    for name in ("loss", "reconstruction_loss", "kl_loss"):
        assert len(history[name]) == 2
        assert len(history[f"val_{name}"]) == 2
        assert all(np.isfinite(history[name]))


@pytest.mark.parametrize("params", [DENSE, CONV], ids=["dense", "conv"])
def test_fit_with_labels_dataset_and_output_shape(params, data):
    model = build(params, data)
    ds = data.dataset("train", 16, shuffle=True)  # (x, y) pairs: labels are ignored
    history = model.fit(ds, epochs=2, shuffle=False, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    out = model.predict(data.x["test"][:5], verbose=0)
    assert out.shape == (5, 8, 8, 1)
    assert out.min() >= 0.0 and out.max() <= 1.0  # sigmoid for bce
    assert model(data.x["test"][:5], training=True).shape == (5, 8, 8, 1)


@pytest.mark.parametrize(
    "params, shape",
    [
        (VAEParams(hidden=[16], latent_dim=3, reconstruction="mse"), (16, 16, 1)),
        (VAEParams(encoder="conv", hidden=[4, 8], latent_dim=3), (16, 16, 1)),
        (VAEParams(hidden=[8], latent_dim=2), (12,)),
    ],
)
def test_other_shapes(params, shape):
    data = make_data(shape, n=8)
    model = build(params, data)
    assert model.predict(data.x["test"], verbose=0).shape == (8, *shape)
    model.evaluate(data.x["test"], verbose=0)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.build(VAEParams(encoder="conv", hidden=[4, 4, 4]), make_data((12, 12, 1), n=4))
    with pytest.raises(ValueError, match="needs images"):
        vae.build(VAEParams(encoder="conv", hidden=[4]), make_data((12,), n=4))
    data = make_data(n=4)
    data.value_range = (-1.0, 1.0)
    with pytest.raises(ValueError, match="mse"):
        vae.build(DENSE, data)


def test_reparameterization_gradient_flows():
    sampler = vae.Sampling(seed=3)
    z_mean = tf.Variable(tf.zeros((4, 2)))
    z_log_var = tf.Variable(tf.zeros((4, 2)))
    with tf.GradientTape() as tape:
        z = sampler((z_mean, z_log_var))
        loss = tf.reduce_sum(tf.square(z - 1.0))
    g_mean, g_log_var = tape.gradient(loss, [z_mean, z_log_var])
    assert g_mean is not None and g_log_var is not None
    assert np.abs(g_mean.numpy()).sum() > 0
    assert np.abs(g_log_var.numpy()).sum() > 0


def test_kl_weight_zero_leaves_reconstruction(data):
    model = build(DENSE, data)
    assert set(model.loss_weights) == {"reconstruction", "kl"}
    model.loss_weights["kl"].assign(0.0)
    result = model.evaluate(data.x["test"], batch_size=16, verbose=0, return_dict=True)
    assert result["kl_loss"] > 0
    assert result["loss"] == pytest.approx(result["reconstruction_loss"], rel=1e-6)
    model.loss_weights["kl"].assign(1.0)
    result = model.evaluate(data.x["test"], batch_size=16, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(
        result["reconstruction_loss"] + result["kl_loss"], rel=1e-5
    )


def test_save_and_load_give_same_predictions(trained, data, tmp_path):
    model, _ = trained
    model.loss_weights["kl"].assign(0.5)
    path = tmp_path / "vae.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, vae.VAE)
    x = data.x["test"][:8]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert float(loaded.loss_weights["kl"].numpy()) == 0.5
    assert loaded.seed == model.seed
    history = loaded.fit(x, epochs=1, verbose=0).history  # still trainable after loading
    assert np.isfinite(history["loss"][0])
    model.loss_weights["kl"].assign(1.0)


@pytest.mark.parametrize("latent_dim", [2, 3])
def test_plots(latent_dim, data):
    model = build(VAEParams(hidden=[16, 8], latent_dim=latent_dim), data)
    figures = dict(vae_plots.plots(None, model, data))
    expected = {"reconstructions.png", "latent_scatter.png", "samples.png"}
    expected.add("latent_traversal.png")
    if latent_dim == 2:
        expected.add("latent_manifold.png")
    assert set(figures) == expected
    for fig in figures.values():
        assert isinstance(fig, Figure)
        assert max(fig.get_size_inches()) <= 8


def test_plots_without_labels_or_images():
    data = make_data((12,), n=8)
    data.y = {s: None for s in data.y}
    model = build(VAEParams(hidden=[8], latent_dim=1), data)
    assert [name for name, _ in vae_plots.plots(None, model, data)] == ["latent_scatter.png"]


def test_builds_are_reproducible(data):
    x = data.x["test"][:4]

    def sampled():
        keras.utils.set_random_seed(1)
        model = vae.build(DENSE, data)
        z_mean, z_log_var = model.encode(x)
        return keras.ops.convert_to_numpy(model.sampler((z_mean, z_log_var)))

    first, second = sampled(), sampled()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, sampled()[::-1])  # not trivially constant


def test_common_helpers():
    weights = make_loss_weights(["a", "b"], {"b": 0.25})
    assert float(weights["a"].numpy()) == 1.0 and float(weights["b"].numpy()) == 0.25
    assert not weights["a"].trainable and weights["a"].dtype == "float32"
    with pytest.raises(ValueError, match="unknown"):
        make_loss_weights(["a"], {"c": 1.0})

    class Holder:
        loss_weights = weights

    set_loss_weights(Holder(), {"a": 3.0})
    assert float(weights["a"].numpy()) == 3.0
    with pytest.raises(ValueError, match="no loss term"):
        set_loss_weights(Holder(), {"kl": 1.0})
    loss = tf.constant(2.0)
    assert float(replica_scaled(loss)) == 2.0
