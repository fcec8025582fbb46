"""U-Net segmentation (dlpipe.models.unet.model) and the segmentation_report stage: metric
arithmetic on hand-made masks, model shapes, and one short pipeline run through the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlpipe.data import DataBundle  # noqa: E402
from dlpipe.errors import DlpipeError  # noqa: E402
from dlpipe.models.unet import UNetParams  # noqa: E402
from dlpipe.models.unet import model as unet  # noqa: E402
from dlpipe.stages.reports import segmentation as report  # noqa: E402

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def test_a_perfect_prediction_scores_one_even_with_absent_classes():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (5, 16, 16))  # class 3 of 4 never occurs
    scores = report.segmentation_scores(masks, masks.copy(), num_classes=4)
    assert scores.miou == 1.0
    assert scores.dice == 1.0
    assert scores.pixel_accuracy == 1.0
    assert report.mean_iou(masks, masks, 4) == 1.0
    assert report.mean_dice(masks, masks, 4) == 1.0
    np.testing.assert_array_equal(scores.present, [True, True, True, False])
    assert np.isnan(scores.iou[3]) and np.isnan(scores.dice_per_class[3])


def test_hand_made_case():
    # class 0: TP 1, FP 0, FN 1 -> IoU 1/2, Dice 2/3
    # class 1: TP 2, FP 1, FN 0 -> IoU 2/3, Dice 4/5
    # class 2: absent from truth and prediction -> nan, left out of the means
    y_true = np.array([[0, 0], [1, 1]])
    y_pred = np.array([[0, 1], [1, 1]])
    scores = report.segmentation_scores(y_true, y_pred, num_classes=3)
    np.testing.assert_array_equal(scores.confusion, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    np.testing.assert_allclose(scores.iou[:2], [1 / 2, 2 / 3])
    np.testing.assert_allclose(scores.dice_per_class[:2], [2 / 3, 4 / 5])
    assert np.isnan(scores.iou[2])
    assert scores.miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores.dice == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores.pixel_accuracy == pytest.approx(3 / 4)

    metrics = report.scores_as_metrics(scores, "test", ["back ground", "circle", "square"])
    assert metrics["test_miou"] == pytest.approx(7 / 12)
    assert metrics["test_iou_back_ground"] == pytest.approx(1 / 2)
    assert metrics["test_dice_circle"] == pytest.approx(4 / 5)
    assert "test_iou_square" not in metrics  # absent classes are not logged


def test_a_false_alarm_class_counts_as_zero():
    y_true = np.zeros((4, 4), dtype=int)
    y_pred = y_true.copy()
    y_pred[0, 0] = 2  # predicted, never true: IoU 0, and it drags the mean down
    scores = report.segmentation_scores(y_true, y_pred, num_classes=3)
    assert scores.iou[2] == 0.0 and scores.dice_per_class[2] == 0.0
    assert scores.miou == pytest.approx((15 / 16 + 0.0) / 2)


def test_mean_iou_matches_keras_mean_iou_on_probabilities():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, (6, 8, 8))  # class 3 absent from the truth
    probs = rng.random((6, 8, 8, 4)).astype("float32")
    probs[..., 3] *= 0.2  # and rarely predicted
    probs /= probs.sum(axis=-1, keepdims=True)
    metric = keras.metrics.MeanIoU(num_classes=4, sparse_y_pred=False)
    metric.update_state(y, probs)
    ours = report.mean_iou(y, report.predicted_masks(probs), 4)
    assert ours == pytest.approx(float(metric.result()), abs=1e-6)


def test_label_checks_and_binary_outputs():
    with pytest.raises(ValueError, match="shapes differ"):
        report.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report.confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    np.testing.assert_array_equal(
        report.predicted_masks(np.array([[[[0.2], [0.7]]]])), [[[0, 1]]]
    )
    np.testing.assert_array_equal(
        report.predicted_masks(np.array([[[[-1.0], [3.0]]]])), [[[0, 1]]]
    )


def test_colorize_uses_one_colour_per_class():
    colours = report.palette(4)
    assert colours.shape == (4, 3) and len({tuple(c) for c in colours}) == 4
    rgb = report.colorize(np.array([[0, 3], [1, 1]]), colours)
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[1, 0], colours[1])
    np.testing.assert_array_equal(rgb[0, 1], colours[3])


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def seg_data(size=16, n=8, channels=3, num_classes=4) -> DataBundle:
    rng = np.random.default_rng(0)
    x = {s: rng.random((n, size, size, channels)).astype("float32") for s in ("train", "test")}
    y = {s: rng.integers(0, num_classes, (n, size, size)).astype("int32") for s in x}
    return DataBundle(x=x, y=y, task="segmentation", num_classes=num_classes,
                      class_names=[str(k) for k in range(num_classes)])


@pytest.mark.parametrize(
    ("depth", "upsampling"), [(1, "transpose"), (2, "bilinear"), (3, "nearest"), (4, "transpose")]
)
def test_unet_outputs_per_pixel_probabilities(depth, upsampling):
    data = seg_data(size=16)
    params = UNetParams(depth=depth, base_filters=4, upsampling=upsampling)
    model = unet.build(params, data)
    out = keras.ops.convert_to_numpy(model(data.x["test"][:3]))
    assert out.shape == (3, 16, 16, 4)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
    # one max pooling per level: the bottleneck is 16 / 2**depth pixels wide
    assert model.get_layer("bottleneck_act1").output.shape[1] == 16 // 2**depth
    assert len([la for la in model.layers if isinstance(la, keras.layers.Concatenate)]) == depth


def test_without_skip_connections_it_is_a_plain_encoder_decoder():
    data = seg_data(size=16)
    with_skips = unet.build(UNetParams(depth=2, base_filters=4), data)
    plain = unet.build(UNetParams(depth=2, base_filters=4, skip_connections=False), data)
    assert plain.name == "encoder_decoder"
    assert not [la for la in plain.layers if isinstance(la, keras.layers.Concatenate)]
    # the decoder convolutions see only the up-sampled features: fewer input channels
    assert plain.count_params() < with_skips.count_params()
    assert plain(data.x["test"][:2]).shape == (2, 16, 16, 4)


def test_options_batchnorm_dropout_convs():
    data = seg_data(size=8, channels=1, num_classes=2)
    params = UNetParams(depth=1, base_filters=4, batchnorm=False, dropout=0.2, convs_per_block=3)
    model = unet.build(params, data)
    kinds = [type(la).__name__ for la in model.layers]
    assert "BatchNormalization" not in kinds
    assert kinds.count("SpatialDropout2D") == 3  # encoder, bottleneck, decoder
    assert model.get_layer("enc0_conv2") is not None
    assert model(data.x["test"][:1]).shape == (1, 8, 8, 2)


def test_sizes_that_do_not_divide_are_refused():
    with pytest.raises(DlpipeError, match="divide by 8"):
        unet.build(UNetParams(depth=3), seg_data(size=12))
    flat = DataBundle(x={"train": np.zeros((2, 5), "float32")}, y={"train": None}, num_classes=2)
    with pytest.raises(DlpipeError, match="needs images"):
        unet.build(UNetParams(), flat)


def test_unet_passes_the_conformance_harness_and_learns(host, monkeypatch):
    from dlpipe.stages.train import fit as train
    from dlpipe.testing import check_architecture

    entry = host.registry.models["unet"]
    assert entry.task == "segmentation"
    assert "segmentation_report" in host.registry.stages["evaluate"]
    base = train.default_loss
    if base("segmentation")[0] is None:  # until train.default_loss knows "segmentation"
        monkeypatch.setattr(
            train,
            "default_loss",
            lambda task: ("sparse_categorical_crossentropy", ["accuracy"])
            if task == "segmentation"
            else base(task),
        )
    model = check_architecture(entry)  # example_data: 8x8 shapes, 4 classes
    assert model.output_shape == (None, 8, 8, 4)
    data = unet.example_data()
    assert data.y["train"].shape == (16, 8, 8) and data.y["train"].max() >= 1
    history = model.fit(data.dataset("train", 8), epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unet_pipeline_logs_miou_dice_mask_grid_and_a_loadable_model(workdir, repo, capsys):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "unet.yaml"),
            "--set", "data.n=240",
            "--set", "data.size=16",
            "--set", "model.depth=2",
            "--set", "model.base_filters=4",
            "--set", "train.epochs=2",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "segmentation_report (test, 24 images)" in out
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-segmentation")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    metrics = run.data.metrics
    for key in ("test_miou", "test_dice", "test_pixel_accuracy", "test_loss", "test_accuracy",
                "test_iou_background"):
        assert key in metrics, key
    assert 0.0 <= metrics["test_miou"] <= metrics["test_dice"] <= 1.0  # Dice >= IoU per class
    assert metrics["test_iou_background"] > 0.5  # the easy class after two epochs
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/segmentation_masks.png", "plots/per_class_iou.png",
            "plots/learning_curves.png"} <= plots

    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert model.name == "unet"
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    assert model.predict(x, verbose=0).shape == (2, 16, 16, 4)
