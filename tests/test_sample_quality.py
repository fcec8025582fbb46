"""The sample_quality evaluate stage (dlpipe.stages.reports.sample_quality) and the GANs'
robustness: generate_samples, mixed precision, the NaN guard on d_loss / g_loss."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from types import SimpleNamespace  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.errors import DlpipeError, TrainingDiverged  # noqa: E402
from dlpipe.models.gan import CGANParams, GANParams  # noqa: E402
from dlpipe.models.gan import model as gan  # noqa: E402
from dlpipe.models.wgan_gp import WGANGPParams  # noqa: E402
from dlpipe.models.wgan_gp import model as wgan_gp  # noqa: E402
from dlpipe.stages.reports import QualityClassifierParams, SampleQualityParams  # noqa: E402
from dlpipe.stages.reports import sample_quality as sq  # noqa: E402

TINY = {"latent_dim": 4, "filters": [8, 4], "sample_every": 0}
TINY_JUDGE = {"filters": [4], "features": 8, "epochs": 1, "batch_size": 32}


def labelled_data(n=48, shape=(8, 8, 1), classes=3, seed=0, name="toy") -> DataBundle:
    rng = np.random.default_rng(seed)
    x = {s: (2 * rng.random((n, *shape)) - 1).astype("float32") for s in ("train", "val", "test")}
    y = {s: rng.integers(0, classes, n).astype("int32") for s in ("train", "val", "test")}
    return DataBundle(
        x=x, y=y, num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
        value_range=(-1.0, 1.0), name=name,
    )  # fmt: skip


@pytest.fixture
def float32_policy():
    """Leave the process-wide dtype policy as float32, whatever the test set."""
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------------------
# The scores
# --------------------------------------------------------------------------------------


def correlated_features(n=400, d=6, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_symmetric():
    a = correlated_features(seed=1)
    b = correlated_features(seed=2)
    assert sq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert sq.frechet_distance(a, b) == pytest.approx(sq.frechet_distance(b, a), rel=1e-8)
    assert sq.frechet_distance(a, b) > 0.1


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    a = correlated_features(seed=3)
    shift = np.array([0.5, -1.0, 2.0, 0.0, 0.25, 1.0])
    # same covariance: the trace terms cancel, only ||mu_a - mu_b||^2 is left
    assert sq.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-7)
    distances = [sq.frechet_distance(a, a + t * shift) for t in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(4)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    a = rng.normal(1.0, 0.5, size=(40000, 1))
    b = rng.normal(-1.0, 2.0, size=(40000, 1))
    assert sq.frechet_distance(a, b) == pytest.approx(4.0 + 1.5**2, rel=0.02)
    # N(0, I) vs N(m, 4 I) in d dimensions: ||m||^2 + d * (1 - 2)^2
    d, m = 4, np.array([1.0, 0.0, -1.0, 2.0])
    a = rng.normal(size=(40000, d))
    b = m + 2.0 * rng.normal(size=(40000, d))
    assert sq.frechet_distance(a, b) == pytest.approx(m @ m + d, rel=0.02)


def test_frechet_trace_term_agrees_with_scipy_sqrtm():
    from scipy.linalg import sqrtm

    a, b = correlated_features(seed=5), correlated_features(seed=6) * 0.7
    mu_a, cov_a = sq.gaussian_stats(a)
    mu_b, cov_b = sq.gaussian_stats(b)
    root = sqrtm(cov_a @ cov_b).real  # the classic FID recipe, imaginary noise dropped
    expected = float(
        (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    )
    assert sq.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="n >= 2"):
        sq.frechet_distance(a[:1], b)


def test_confidence_and_coverage_on_hand_made_probabilities():
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]]
    )
    confidence, coverage = sq.confidence_and_coverage(probs)
    assert confidence == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)
    # predicted shares 3/4, 1/4, 0; default threshold 1/(2K) = 1/6: two classes covered
    assert coverage == pytest.approx(2 / 3)
    assert sq.confidence_and_coverage(probs, min_share=0.3)[1] == pytest.approx(1 / 3)
    np.testing.assert_allclose(sq.class_shares(probs), [0.75, 0.25, 0.0])
    uniform = np.full((10, 4), 0.25)
    assert sq.confidence_and_coverage(uniform) == pytest.approx((0.25, 0.25))  # argmax: 0


def test_inception_score_ranges_from_one_to_the_class_count():
    one_hot = np.eye(5)[np.arange(50) % 5]
    assert sq.inception_score(one_hot) == pytest.approx(5.0, rel=1e-6)
    collapsed = np.eye(5)[np.zeros(50, dtype=int)]  # confident, but always class 0
    assert sq.inception_score(collapsed) == pytest.approx(1.0, rel=1e-6)
    undecided = np.full((50, 5), 0.2)
    assert sq.inception_score(undecided) == pytest.approx(1.0, rel=1e-6)
    half = np.eye(5)[np.arange(50) % 2]  # two classes only
    assert sq.inception_score(half) == pytest.approx(2.0, rel=1e-6)


# --------------------------------------------------------------------------------------
# The cached judge
# --------------------------------------------------------------------------------------


def test_judge_is_trained_once_and_then_reused(tmp_path):
    data = labelled_data()
    settings = QualityClassifierParams(**TINY_JUDGE)
    first, trained, path = sq.quality_classifier(data, settings, cache_dir=tmp_path)
    assert trained and path.exists() and path.parent == tmp_path
    assert path.name.startswith("toy-8x8x1-range-1_1-") and path.suffix == ".keras"
    mtime = path.stat().st_mtime_ns
    again, trained, same = sq.quality_classifier(data, settings, cache_dir=tmp_path)
    assert not trained and same == path and path.stat().st_mtime_ns == mtime
    x = data.x["test"][:6]
    np.testing.assert_allclose(again.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6)
    probs, feats = sq.judge(again, x, batch_size=4)
    assert probs.shape == (6, 3) and feats.shape == (6, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # other labels, or other judge settings: another key, so a new judge
    config = settings.model_dump(exclude={"retrain"})
    key = sq.classifier_key(data, config)
    assert path.stem == key
    assert sq.classifier_key(labelled_data(seed=0), config) == key  # equal arrays
    relabelled = labelled_data()
    relabelled.y["train"] = (relabelled.y["train"] + 1) % 3
    assert sq.classifier_key(relabelled, config) != key
    assert sq.classifier_key(data, {**config, "features": 12}) != key
    # retrain forces training, into the same file; so does a file that does not load
    retrain = QualityClassifierParams(**TINY_JUDGE, retrain=True)
    _, trained, same = sq.quality_classifier(data, retrain, cache_dir=tmp_path)
    assert trained and same == path
    path.write_bytes(b"not a keras file")
    _, trained, same = sq.quality_classifier(data, settings, cache_dir=tmp_path)
    assert trained and same == path and path.stat().st_size > 1000
    assert not list(tmp_path.glob(".*partial*"))


def test_stage_errors_are_clear(tmp_path):
    data = labelled_data()
    params = SampleQualityParams(num_samples=10, classifier=TINY_JUDGE)
    no_sampler = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()], name="plain")
    ctx = SimpleNamespace(model=no_sampler, data=data, stage=None)
    with pytest.raises(DlpipeError, match="'plain' has no generate_samples"):
        sq.sample_quality(ctx, params)
    model = gan.build(GANParams(**TINY), data)
    unlabelled = labelled_data()
    unlabelled.y = {s: None for s in unlabelled.y}
    unlabelled.num_classes = None
    with pytest.raises(DlpipeError, match="class labels"):
        sq.sample_quality(SimpleNamespace(model=model, data=unlabelled, stage=None), params)
    no_test = labelled_data()
    no_test.x["test"] = no_test.x["test"][:0]
    with pytest.raises(DlpipeError, match="held-out"):
        sq.sample_quality(SimpleNamespace(model=model, data=no_test, stage=None), params)


# --------------------------------------------------------------------------------------
# generate_samples on the GANs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "params"),
    [(gan.build, GANParams(**TINY)), (wgan_gp.build, WGANGPParams(**TINY))],
    ids=["gan", "wgan_gp"],
)
def test_generate_samples_is_seeded_and_in_range(builder, params):
    model = builder(params, labelled_data())
    samples = model.generate_samples(300, seed=7)
    assert isinstance(samples, np.ndarray) and samples.dtype == np.float32
    assert samples.shape == (300, 8, 8, 1)  # several generation batches
    assert samples.min() >= -1.0 and samples.max() <= 1.0  # tanh for [-1, 1] data
    np.testing.assert_allclose(model.generate_samples(300, seed=7), samples)
    assert not np.allclose(model.generate_samples(300, seed=8), samples)
    with pytest.raises(ValueError, match="unconditional"):
        model.generate_samples(3, labels=[0, 1, 2])


def test_conditional_gan_samples_balanced_or_requested_labels():
    model = gan.build_conditional(CGANParams(**TINY), labelled_data())
    balanced = model.generate_samples(6, seed=1)
    z = np.random.default_rng(1).standard_normal((6, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(model.generate(z, np.arange(6) % 3))
    np.testing.assert_allclose(balanced, expected, atol=1e-6)
    twos = model.generate_samples(6, labels=np.full(6, 2), seed=1)
    assert not np.allclose(twos, balanced)
    with pytest.raises(ValueError, match="labels for 6 samples"):
        model.generate_samples(6, labels=[0, 1])


# --------------------------------------------------------------------------------------
# Mixed precision and the NaN guard
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "params"),
    [
        (gan.build_conditional, CGANParams(**TINY, label_smoothing=0.1)),
        (wgan_gp.build, WGANGPParams(**TINY, critic_steps=2)),
    ],
    ids=["cgan", "wgan_gp"],
)
def test_mixed_float16_gan_steps_are_finite_and_loss_scaled(builder, params, float32_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    data = labelled_data(n=16)
    model = builder(params, data)
    assert model.generator.get_layer("up_0").compute_dtype == "float16"
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    for optimizer in (model.optimizer, model.d_optimizer):
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer.beta_1 == model.d_optimizer.inner_optimizer.beta_1
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.discriminator.trainable_variables]
    history = model.fit(data.dataset("train", 8), epochs=2, shuffle=False, verbose=0).history
    for key in ("d_loss", "g_loss"):
        assert np.all(np.isfinite(history[key])), (key, history[key])
    after = model.discriminator.trainable_variables
    assert any(
        not np.allclose(b, keras.ops.convert_to_numpy(a)) for b, a in zip(before, after, strict=True)
    )  # the scaled critic steps were applied (not all skipped as overflows)
    labels = np.arange(4) % 3 if model.conditional else None
    scores = model.discriminate(data.x["test"][:4], labels)
    assert keras.backend.standardize_dtype(scores.dtype) == "float32"
    samples = model.generate_samples(5, seed=0)
    assert samples.dtype == np.float32 and np.all(np.isfinite(samples))
    # an explicit discriminator optimizer is wrapped too
    model.compile(optimizer=keras.optimizers.Adam(1e-3), d_optimizer=keras.optimizers.SGD(0.1))
    assert isinstance(model.d_optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.d_optimizer.inner_optimizer, keras.optimizers.SGD)


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    return MlflowClient(default_tracking_uri())


NAN_GAN = """\
name: nan-gan
experiment: tests
seed: 1
stages:
  - {kind: data, use: npz, params: {path: bad.npz, task: unsupervised, normalize: none}}
  - kind: model
    use: gan
    params: {latent_dim: 4, filters: [8, 4], sample_every: 0, output_activation: sigmoid}
  - {kind: train, use: keras_fit, params: {epochs: 3, batch_size: 16, verbose: 0}}
"""


@pytest.mark.slow
def test_nan_guard_fails_a_gan_run_on_d_loss(monkeypatch, workdir, float32_policy):
    # The data stages refuse NaN input; let one through to reach the training guard.
    monkeypatch.setattr("dlpipe.datacheck.check_arrays", lambda *a, **k: None)
    from dlpipe.engine import run_pipeline
    from dlpipe.plugins import load_plugins
    from dlpipe.spec import load_yaml, validate

    x = np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")
    x[3, 2, 2, 0] = np.nan  # one poisoned pixel: the discriminator's loss becomes NaN
    np.savez(workdir / "bad.npz", x=x)
    host = load_plugins(plugin_dirs=[], entry_points=False)
    spec = validate(load_yaml(NAN_GAN, "nan_gan.yaml"), host.registry)
    with pytest.raises(TrainingDiverged, match=r"stage 'train': [dg]_loss became nan in epoch 1"):
        run_pipeline(spec, host)
    exp = mlflow_client().get_experiment_by_name("tests")
    (run,) = mlflow_client().search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["dlpipe.error"]
    assert [m.step for m in mlflow_client().get_metric_history(run.info.run_id, "d_loss")] == [0]


# --------------------------------------------------------------------------------------
# End to end: the gan pipeline with its sample_quality stage
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gan_pipeline_logs_quality_metrics_and_reuses_its_judge(
    workdir, repo, capsys, float32_policy
):
    from dlpipe.cli import main

    tiny = [
        "--set", "train.epochs=1",
        "--set", "data.limit=300",
        "--set", "model.filters=[8, 4]",
        "--set", "model.latent_dim=8",
        "--set", "model.sample_every=1",
        "--set", "quality.num_samples=200",
        "--set", "quality.classifier.epochs=4",
        "--set", "quality.classifier.filters=[8]",
        "--set", "quality.classifier.features=16",
        "--set", "quality.classifier.learning_rate=0.003",
        "--set", "quality.classifier.batch_size=32",
    ]  # fmt: skip
    assert main(["run", str(repo / "pipelines" / "gan.yaml"), *tiny]) == 0
    out = capsys.readouterr().out
    assert "sample_quality: trained a judge classifier" in out
    (cached,) = (workdir / "mlruns" / "quality_classifiers").glob("*.keras")
    assert cached.name.startswith("sklearn_digits-16x16x1-range-1_1-")

    client = mlflow_client()
    exp = client.get_experiment_by_name("dlpipe-gan")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for which in ("generated", "real"):
        for score in ("confidence", "coverage", "inception_score", "frechet"):
            assert np.isfinite(metrics[f"quality_{which}_{score}"]), (which, score)
    assert 0.0 <= metrics["quality_generated_coverage"] <= 1.0
    assert 1.0 <= metrics["quality_generated_inception_score"] <= 10.0
    assert metrics["quality_classifier_accuracy"] > 0.4  # 4 epochs on 270 digits: ~0.7
    # after one epoch the samples are far from digits; held-out digits are close to
    # the training digits
    assert metrics["quality_real_frechet"] < metrics["quality_generated_frechet"]
    assert metrics["quality_real_confidence"] > metrics["quality_generated_confidence"]
    assert "quality_generated_label_accuracy" not in metrics  # unconditional
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/quality_classes.png", "plots/quality_samples.png", "plots/samples.png"} <= plots
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, gan.GAN)
    assert model.generate_samples(4, seed=0).shape == (4, 16, 16, 1)

    # A second run, now in mixed precision: finite GAN losses, and the (float32)
    # judge is reused from the cache rather than trained again.
    mtime = cached.stat().st_mtime_ns
    assert main(["run", str(repo / "pipelines" / "gan.yaml"), *tiny,
                 "--set", "precision=mixed_float16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "sample_quality: reusing the cached judge classifier" in out
    assert cached.stat().st_mtime_ns == mtime
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[0].data.params.get("precision") == "mixed_float16"
    for key in ("d_loss", "g_loss", "quality_generated_frechet"):
        assert np.isfinite(runs[0].data.metrics[key])
