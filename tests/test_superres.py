"""Super-resolution (dlpipe.models.espcn.model, dlpipe.models.srgan.model) and the PSNR/SSIM
metrics (dlpipe.models.image_quality): numerical checks on tiny data, and one short
pipeline run per architecture through the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.models.common import set_loss_weights  # noqa: E402
from dlpipe.models.espcn import ESPCNParams  # noqa: E402
from dlpipe.models.espcn import model as espcn  # noqa: E402
from dlpipe.models.image_quality import PSNR_CAP, psnr, ssim  # noqa: E402
from dlpipe.models.srgan import SRGANParams  # noqa: E402
from dlpipe.models.srgan import model as srgan  # noqa: E402

TINY_ESPCN = {"scale": 2, "filters": [8, 4], "kernel_sizes": [3, 3], "sample_every": 0}
TINY_SRGAN = {
    "scale": 2,
    "filters": 8,
    "residual_blocks": 1,
    "d_filters": [8],
    "d_dense": 8,
    "sample_every": 0,
}


def as_np(value):
    return keras.ops.convert_to_numpy(value)


def smooth_images(n=32, size=8, channels=1, seed=0) -> np.ndarray:
    """Blurry random blobs in [0, 1]: something a small upscaler can learn."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, size // 4, size // 4, channels)).astype("float32")
    return tf.image.resize(coarse, (size, size), method="bilinear").numpy().clip(0, 1)


def make_data(n=32, size=8, channels=1, seed=0) -> DataBundle:
    x = {
        s: smooth_images(n, size, channels, seed + i)
        for i, s in enumerate(("train", "val", "test"))
    }
    y = {s: np.zeros(n, "int32") for s in x}
    return DataBundle(x=x, y=y, task="classification", num_classes=1, class_names=["x"])


def compiled(builder, params, data, lr=1e-3):
    keras.utils.set_random_seed(0)
    model = builder(params, data)
    model.compile(optimizer=keras.optimizers.Adam(lr))
    return model


# --------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_capped():
    x = np.random.default_rng(0).random((3, 8, 8, 3)).astype("float32")
    values = as_np(psnr(x, x))
    assert values.shape == (3,)
    assert np.all(values == PSNR_CAP) and PSNR_CAP == 100.0
    assert float(as_np(psnr(x[0], x[0]))) == PSNR_CAP  # one (h, w, c) image: a scalar


def test_psnr_known_value_for_a_constant_offset():
    a = np.full((2, 6, 5, 1), 0.3, "float32")
    b = a + 0.1  # MSE 0.01: 10 * log10(1 / 0.01) = 20 dB
    np.testing.assert_allclose(as_np(psnr(a, b, max_val=1.0)), [20.0, 20.0], rtol=1e-5)
    # max_val 255 and an offset of 5: 10 * log10(255^2 / 25)
    expected = 10 * np.log10(255.0**2 / 25.0)
    np.testing.assert_allclose(as_np(psnr(a * 255, a * 255 + 5, 255.0)), expected, rtol=1e-5)
    # symmetric, and it agrees with TensorFlow's implementation on random images
    rng = np.random.default_rng(1)
    x, y = rng.random((4, 8, 8, 3)).astype("float32"), rng.random((4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(as_np(psnr(x, y)), as_np(psnr(y, x)))
    np.testing.assert_allclose(as_np(psnr(x, y)), tf.image.psnr(x, y, 1.0).numpy(), rtol=1e-5)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    rng = np.random.default_rng(2)
    x = smooth_images(4, 32, 3)
    assert np.allclose(as_np(ssim(x, x)), 1.0, atol=1e-6)
    scores = []
    for std in (0.02, 0.1, 0.3):
        noisy = np.clip(x + std * rng.standard_normal(x.shape), 0, 1).astype("float32")
        value = as_np(ssim(noisy, x))
        assert value.shape == (4,) and np.all(value < 1.0)
        # the standard definition: the same as TensorFlow's 11x11 Gaussian SSIM
        np.testing.assert_allclose(value, tf.image.ssim(noisy, x, 1.0).numpy(), rtol=1e-4)
        scores.append(value.mean())
    assert scores[0] > scores[1] > scores[2]
    # images smaller than the window use a smaller one; still 1 when identical
    small = x[:, :6, :5]
    assert np.allclose(as_np(ssim(small, small)), 1.0, atol=1e-6)
    assert np.all(as_np(ssim(small, 1.0 - small)) < 0.5)


# --------------------------------------------------------------------------------------
# Sub-pixel upsampling
# --------------------------------------------------------------------------------------


def numpy_depth_to_space(x: np.ndarray, r: int) -> np.ndarray:
    """The definition, one output pixel at a time."""
    n, h, w, depth = x.shape
    c = depth // (r * r)
    out = np.zeros((n, h * r, w * r, c), x.dtype)
    for y in range(h * r):
        for xx in range(w * r):
            i, j = y % r, xx % r
            out[:, y, xx, :] = x[:, y // r, xx // r, (i * r + j) * c : (i * r + j + 1) * c]
    return out


@pytest.mark.parametrize("r,c", [(2, 1), (2, 3), (3, 2), (4, 1)])
def test_depth_to_space_matches_the_numpy_reference(r, c):
    x = np.arange(2 * 3 * 4 * c * r * r, dtype="float32").reshape(2, 3, 4, c * r * r)
    out = as_np(espcn.depth_to_space(x, r))
    assert out.shape == (2, 3 * r, 4 * r, c)
    np.testing.assert_array_equal(out, numpy_depth_to_space(x, r))
    np.testing.assert_array_equal(out, tf.nn.depth_to_space(x, r).numpy())
    # the first r x r output block of channel 0 holds input channels 0, c, 2c, ...
    np.testing.assert_array_equal(out[0, :r, :r, 0].ravel(), x[0, 0, 0, ::c])
    with pytest.raises(ValueError, match="divide"):
        espcn.depth_to_space(np.zeros((1, 2, 2, 3), "float32"), 2)


def test_sub_pixel_layer_in_a_fully_convolutional_network():
    net = espcn.build_espcn_network(channels=3, scale=3, filters=[4], kernel_sizes=[3])
    for side in (4, 7):  # any input size: the network is fully convolutional
        out = net(np.zeros((2, side, side + 1, 3), "float32"))
        assert tuple(out.shape) == (2, 3 * side, 3 * (side + 1), 3)
    assert net.get_layer("depth_to_space").compute_output_shape((None, 4, 5, 27)) == (
        None,
        12,
        15,
        3,
    )


# --------------------------------------------------------------------------------------
# ESPCN
# --------------------------------------------------------------------------------------


def test_espcn_downsamples_then_upscales_and_reports_bicubic_metrics():
    data = make_data(size=8)
    model = compiled(espcn.build, ESPCNParams(**TINY_ESPCN), data)
    hr = data.x["test"][:5]
    lr = as_np(model.downsample(hr))
    block_means = hr.reshape(5, 4, 2, 4, 2, 1).mean(axis=(2, 4))  # area degradation
    np.testing.assert_allclose(lr, block_means, atol=1e-6)
    assert model.predict(hr, verbose=0).shape == hr.shape  # model(hr): same shape
    np.testing.assert_allclose(as_np(model(hr)), as_np(model.upscale(lr)), atol=1e-6)
    assert tuple(as_np(model.upscale(np.zeros((1, 3, 5, 1), "float32"))).shape) == (1, 6, 10, 1)
    assert float(as_np(model.bicubic(lr)).min()) >= 0.0  # clipped to the value range

    result = model.evaluate(data.dataset("test", 16), verbose=0, return_dict=True)
    assert {"loss", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim"} <= set(result)
    bic_psnr, bic_ssim = model.quality(
        model.bicubic(model.downsample(data.x["test"])), data.x["test"]
    )
    assert result["bicubic_psnr"] == pytest.approx(float(np.mean(as_np(bic_psnr))), rel=1e-5)
    assert result["bicubic_ssim"] == pytest.approx(float(np.mean(as_np(bic_ssim))), rel=1e-5)
    # the loss is the pixel MSE, weighted by the named term "content"
    mse = np.mean((model.predict(data.x["test"], verbose=0) - data.x["test"]) ** 2)
    assert result["loss"] == pytest.approx(mse, rel=1e-4)
    set_loss_weights(model, {"content": 3.0})
    weighted = model.evaluate(data.dataset("test", 16), verbose=0, return_dict=True)["loss"]
    assert weighted == pytest.approx(3.0 * mse, rel=1e-4)
    with pytest.raises(ValueError, match="divide by scale 3"):
        espcn.build(ESPCNParams(**{**TINY_ESPCN, "scale": 3}), data)


def test_espcn_learns_to_beat_its_starting_point_and_reloads(tmp_path):
    data = make_data(n=64, size=8)
    model = compiled(espcn.build, ESPCNParams(**TINY_ESPCN), data, lr=1e-2)
    history = model.fit(
        data.dataset("train", 16),
        validation_data=data.dataset("val", 32),
        epochs=3,
        shuffle=False,
        verbose=0,
    ).history
    assert {"loss", "psnr", "val_psnr", "val_ssim", "val_bicubic_psnr"} <= set(history)
    assert history["val_psnr"][-1] > history["val_psnr"][0]
    path = tmp_path / "espcn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, espcn.SuperResolution) and loaded.scale == 2
    x = data.x["test"][:4]
    np.testing.assert_allclose(as_np(loaded(x)), as_np(model(x)), atol=1e-6)
    assert int(as_np(loaded.optimizer.iterations)) == 12  # 64 examples / 16, 3 epochs


# --------------------------------------------------------------------------------------
# SRGAN
# --------------------------------------------------------------------------------------


def test_srgan_loss_terms_are_named_and_weighted():
    data = make_data()
    model = compiled(srgan.build, SRGANParams(**TINY_SRGAN), data)
    assert set(model.loss_weights) == {"content", "adversarial"}
    assert float(as_np(model.loss_weights["adversarial"])) == pytest.approx(1e-3)
    hr = keras.ops.convert_to_tensor(data.x["train"][:8])
    sr = model.upscale(model.downsample(hr))
    for content_w, adv_w in ((1.0, 0.0), (0.5, 2.0)):
        set_loss_weights(model, {"content": content_w, "adversarial": adv_w})  # loss_weights
        total, content, adversarial = (float(as_np(v)) for v in model.generator_loss(hr, sr))
        assert content > 0 and adversarial > 0
        assert total == pytest.approx(content_w * content + adv_w * adversarial, rel=1e-5)
    model.adversarial_gate.assign(0.0)  # pretraining: content only
    total, content, _ = (float(as_np(v)) for v in model.generator_loss(hr, sr))
    assert total == pytest.approx(0.5 * content, rel=1e-5)


def test_srgan_alternates_two_optimizers_and_warms_up():
    data = make_data()
    params = SRGANParams(**TINY_SRGAN, d_learning_rate=5e-4, pretrain_epochs=1)
    model = compiled(srgan.build, params, data, lr=2e-3)
    assert model.d_optimizer is not model.optimizer
    assert float(as_np(model.d_optimizer.learning_rate)) == pytest.approx(5e-4)
    assert model.optimizer.beta_1 == model.d_optimizer.beta_1 == 0.9
    assert float(as_np(model.adversarial_gate)) == 0.0
    g_before = [as_np(v).copy() for v in model.upscaler.trainable_variables]
    d_before = [as_np(v).copy() for v in model.discriminator.trainable_variables]
    found = srgan.callbacks(None, model, data)
    assert [type(c) for c in found] == [srgan.AdversarialWarmup]
    gates = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            gates.append(float(as_np(self.model.adversarial_gate)))

    history = model.fit(
        data.dataset("train", 16), epochs=2, callbacks=[*found, Record()], shuffle=False, verbose=0
    ).history
    assert gates == [0.0, 1.0]
    assert {"loss", "content_loss", "adversarial_loss", "d_loss", "psnr"} <= set(history)
    assert all(np.isfinite(history["d_loss"] + history["loss"]))
    assert int(as_np(model.optimizer.iterations)) == int(as_np(model.d_optimizer.iterations)) == 4
    for before, var in zip(g_before, model.upscaler.trainable_variables, strict=True):
        assert not np.allclose(before, as_np(var))
    for before, var in zip(d_before, model.discriminator.trainable_variables, strict=True):
        assert not np.allclose(before, as_np(var))


def test_srgan_save_and_load_restore_both_optimizers(tmp_path):
    data = make_data()
    model = compiled(srgan.build, SRGANParams(**TINY_SRGAN), data)
    set_loss_weights(model, {"adversarial": 0.01})
    model.fit(data.dataset("train", 16), epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "srgan.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, srgan.SRGAN) and loaded.scale == 2
    assert float(as_np(loaded.loss_weights["adversarial"])) == pytest.approx(0.01)
    x = data.x["test"][:4]
    np.testing.assert_allclose(as_np(loaded(x)), as_np(model(x)), atol=1e-5)
    np.testing.assert_allclose(
        as_np(loaded.discriminate(x)), as_np(model.discriminate(x)), atol=1e-5
    )
    for saved, restored in zip(
        model.d_optimizer.variables, loaded.d_optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(as_np(saved), as_np(restored))
    assert int(as_np(loaded.d_optimizer.iterations)) == 2
    assert np.isfinite(
        loaded.fit(data.dataset("train", 16), epochs=1, shuffle=False, verbose=0).history["loss"][0]
    )


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


def finished_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.slow
def test_espcn_pipeline_logs_psnr_ssim_grids_and_a_loadable_model(workdir, repo, capsys):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "espcn.yaml"),
            "--set", "train.epochs=2",
            "--set", "data.limit=300",
            "--set", "data.image_size=[16, 16]",
            "--set", "model.filters=[16, 8]",
            "--set", "model.sample_every=1",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "test_bicubic_psnr" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri())
    run = finished_run(client, "dlpipe-superres")
    for key in ("psnr", "val_psnr", "val_ssim", "val_bicubic_psnr", "val_bicubic_ssim"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert all(np.isfinite(m.value) for m in history)
    metrics = run.data.metrics
    assert {"test_psnr", "test_ssim", "test_bicubic_psnr", "test_bicubic_ssim"} <= set(metrics)
    assert 0.0 < metrics["test_ssim"] <= 1.0 and 0.0 < metrics["test_psnr"] < 100.0
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/superres_epoch_001.png", "samples/superres_epoch_002.png"} <= samples
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/superres.png", "plots/psnr_gain.png"} <= plots
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, espcn.SuperResolution) and model.scale == 4
    out = as_np(model.upscale(np.zeros((3, 4, 4, 1), "float32")))
    assert out.shape == (3, 16, 16, 1)


@pytest.mark.slow
def test_srgan_pipeline_runs_with_loss_weights_from_the_spec(workdir, repo):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "srgan.yaml"),
            "--set", "train.epochs=2",
            "--set", "data.n=120",
            "--set", "data.size=16",
            "--set", "model.filters=8",
            "--set", "model.residual_blocks=1",
            "--set", "model.d_filters=[8]",
            "--set", "model.d_dense=16",
            "--set", "model.pretrain_epochs=1",
            "--set", "model.sample_every=2",
            "--set", "train.loss_weights.adversarial=0.05",
        ]
    )  # fmt: skip
    assert rc == 0
    client = MlflowClient(default_tracking_uri())
    run = finished_run(client, "dlpipe-superres")
    assert run.data.params["train.loss_weights.adversarial"] == "0.05"
    for key in ("d_loss", "adversarial_loss", "content_loss", "val_psnr", "val_bicubic_psnr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    assert {"test_psnr", "test_ssim", "test_d_loss"} <= set(run.data.metrics)
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/superres_epoch_002.png" in samples
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, srgan.SRGAN)
    assert float(as_np(model.loss_weights["adversarial"])) == pytest.approx(0.05)
    assert float(as_np(model.adversarial_gate)) == 1.0  # warm-up over after epoch 1
