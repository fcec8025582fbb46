"""One-stage detection: IoU, NMS, mAP (dlpipe.models.yolo.boxes), the YOLO-v1 targets and loss
(dlpipe.models.yolo.model), the detection_report stage, and a short pipeline run."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlpipe.models.yolo.boxes import (  # noqa: E402
    COCO_IOU_THRESHOLDS,
    Detections,
    GroundTruth,
    average_precision,
    batched_nms,
    decode_grid,
    ground_truth,
    iou,
    mean_average_precision,
    nms,
)

# --------------------------------------------------------------------------------------
# IoU and NMS
# --------------------------------------------------------------------------------------


def test_iou_of_a_box_with_itself_is_one_partial_overlap_known_disjoint_zero():
    a = np.array([[0.1, 0.2, 0.5, 0.6]])
    assert iou(a, a)[0, 0] == pytest.approx(1.0)
    # [0,0,2,2] and [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    assert iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0, 0] == pytest.approx(1 / 7)
    # a box half inside another: 2 / 4
    assert iou([[0, 0, 2, 2]], [[1, 0, 2, 2]])[0, 0] == pytest.approx(0.5)
    assert iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0
    assert iou([[0, 0, 1, 1]], [[1, 0, 2, 1]])[0, 0] == 0.0  # touching edges
    matrix = iou(np.zeros((3, 4)) + [0, 0, 1, 1], np.zeros((0, 4)))
    assert matrix.shape == (3, 0)
    assert iou([[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]])[0, 0] == 0.0  # empty boxes


def test_nms_keeps_the_top_box_drops_duplicates_and_keeps_a_distant_box():
    boxes = np.array(
        [
            [0.10, 0.10, 0.40, 0.40],  # duplicate of the top box
            [0.11, 0.10, 0.41, 0.40],  # the top box
            [0.60, 0.60, 0.90, 0.90],  # far away
            [0.12, 0.12, 0.42, 0.41],  # another duplicate
        ]
    )
    scores = np.array([0.8, 0.9, 0.3, 0.7])
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [1, 2]
    assert nms(boxes, scores, iou_threshold=0.5, max_output=1).tolist() == [1]
    # a threshold above every overlap keeps everything, by descending score
    assert nms(boxes, scores, iou_threshold=0.99).tolist() == [1, 0, 3, 2]
    # per class: a duplicate of another class survives
    classes = np.array([1, 0, 0, 0])
    assert sorted(batched_nms(boxes, scores, classes, 0.5).tolist()) == [0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


# --------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------


def test_average_precision_integrates_the_precision_envelope():
    # recall 0.5 at precision 1, then a false positive, then recall 1 at precision 2/3
    ap = average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert average_precision(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def random_truths(n_images=20, seed=0):
    rng = np.random.default_rng(seed)
    truths = []
    for _ in range(n_images):
        k = int(rng.integers(1, 4))
        xy = rng.uniform(0, 0.6, (k, 2))
        wh = rng.uniform(0.1, 0.4, (k, 2))
        truths.append(GroundTruth(np.concatenate([xy, xy + wh], 1), rng.integers(0, 3, k)))
    return truths


def test_perfect_predictions_give_map_one_at_50_and_50_95():
    truths = random_truths()
    preds = [Detections(t.boxes, np.linspace(0.9, 0.5, len(t.classes)), t.classes) for t in truths]
    at50 = mean_average_precision(preds, truths, (0.5,), num_classes=3)
    coco = mean_average_precision(preds, truths, COCO_IOU_THRESHOLDS, num_classes=3)
    assert at50.value == pytest.approx(1.0)
    assert coco.value == pytest.approx(1.0)
    np.testing.assert_allclose(coco.ap, 1.0)
    assert len(COCO_IOU_THRESHOLDS) == 10 and COCO_IOU_THRESHOLDS[-1] == 0.95


def test_map_counts_misses_wrong_classes_and_loose_boxes():
    truths = [
        GroundTruth(np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([0])),
        GroundTruth(np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([0])),
    ]
    preds = [
        Detections(np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([0.9]), np.array([0])),
        # right place, wrong class: a false positive of class 1, a miss of class 0
        Detections(np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([0.8]), np.array([1])),
    ]
    result = mean_average_precision(preds, truths, (0.5,), num_classes=2)
    # class 0: one of two found at precision 1 -> AP 0.5; class 1 has no truth -> NaN
    assert result.ap[0, 0] == pytest.approx(0.5)
    assert np.isnan(result.ap[0, 1])
    assert result.value == pytest.approx(0.5)

    # a box shifted to IoU 2/3 counts at 0.5 ... 0.65, not at 0.7 or above
    shifted = [[0.1 + 0.08, 0.1, 0.5 + 0.08, 0.5]]  # overlap 0.32 x 0.4 / (2 * 0.16 - 0.128)
    assert iou(shifted, truths[0].boxes)[0, 0] == pytest.approx(2 / 3)
    preds = [Detections(np.array(shifted), np.array([0.9]), np.array([0]))]
    result = mean_average_precision(preds, truths[:1], COCO_IOU_THRESHOLDS, num_classes=1)
    assert result.at(0.5) == pytest.approx(1.0) and result.at(0.65) == pytest.approx(1.0)
    assert result.at(0.7) == 0.0
    assert result.value == pytest.approx(0.4)  # 4 of 10 thresholds


def test_a_duplicate_detection_is_a_false_positive():
    truths = [GroundTruth(np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([0]))]
    box = np.array([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5]])
    preds = [Detections(box, np.array([0.6, 0.9]), np.array([0, 0]))]
    # the 0.9 box matches first; the 0.6 one finds the truth taken -> AP still 1
    assert mean_average_precision(preds, truths, (0.5,)).value == pytest.approx(1.0)
    # but the duplicate ranked above a second, missed object lowers precision
    truths = [GroundTruth(np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]), np.array([0, 0]))]
    box = np.array([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    preds = [Detections(box, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]))]
    # TP, FP, TP: recall .5 @ p 1, recall 1 @ p 2/3
    assert mean_average_precision(preds, truths, (0.5,)).value == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ground_truth_drops_padding_rows():
    y = np.array([[[2, 0.1, 0.1, 0.3, 0.3], [-1, 0, 0, 0, 0]], [[-1, 0, 0, 0, 0]] * 2])
    truths = ground_truth(y)
    assert truths[0].classes.tolist() == [2]
    np.testing.assert_allclose(truths[0].boxes, [[0.1, 0.1, 0.3, 0.3]])
    assert truths[1].boxes.shape == (0, 4)


# --------------------------------------------------------------------------------------
# Decoding a YOLO grid
# --------------------------------------------------------------------------------------


def grid_output(grid=4, boxes=2, classes=3):
    out = np.zeros((1, grid, grid, 5 * boxes + classes))
    out[..., 5 * boxes] = 1.0  # every cell says class 0 ...
    # ... one confident box in cell (row 2, col 1): centre (1.5/4, 2.25/4), size .25 x .36
    out[0, 2, 1, :5] = [0.5, 0.25, 0.5, 0.6, 0.9]
    out[0, 2, 1, 5:10] = [0.5, 0.25, 0.52, 0.6, 0.8]  # its near-duplicate
    out[0, 2, 1, 10:] = [0.1, 0.0, 0.9]  # class 2
    return out


def test_decode_grid_places_boxes_in_their_cells_and_suppresses_duplicates():
    (dets,) = decode_grid(grid_output(), boxes=2, score_threshold=0.1, iou_threshold=0.5)
    assert len(dets.scores) == 1
    cx, cy, w, h = 1.5 / 4, 2.25 / 4, 0.25, 0.36
    np.testing.assert_allclose(dets.boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert dets.classes.tolist() == [2]
    assert dets.scores[0] == pytest.approx(0.9 * 0.9)  # confidence x P(class)
    (everything,) = decode_grid(grid_output(), boxes=2, score_threshold=0.1, iou_threshold=1.0)
    assert len(everything.scores) == 2


# --------------------------------------------------------------------------------------
# The YOLO model: targets, loss terms, weights
# --------------------------------------------------------------------------------------


def tiny_bundle():
    from dlpipe.models.yolo.model import example_data

    return example_data()


def tiny_model(**params):
    import keras

    from dlpipe.models.yolo import YOLOParams
    from dlpipe.models.yolo import model as yolo

    keras.utils.set_random_seed(0)
    settings = {"grid": 4, "boxes": 2, "filters": [4, 8], "head_filters": 8, **params}
    return yolo.build(YOLOParams(**settings), tiny_bundle())


def as_np(value):
    import keras

    return keras.ops.convert_to_numpy(value)


def test_encode_targets_puts_each_box_in_the_cell_of_its_centre():
    from dlpipe.models.yolo.loss import encode_targets

    y = np.array(
        [
            [
                [1, 0.30, 0.55, 0.50, 0.95],  # centre (0.40, 0.75): grid 4 -> row 3, col 1
                [2, 0.70, 0.05, 0.90, 0.15],  # centre (0.80, 0.10): row 0, col 3
                [-1, 0, 0, 0, 0],  # padding
                [0, 0.32, 0.60, 0.48, 0.90],  # centre (0.40, 0.75) again: the first wins
            ]
        ],
        dtype="float32",
    )
    t = {k: as_np(v) for k, v in encode_targets(y, grid=4, num_classes=3).items()}
    assert t["object"].shape == (1, 4, 4)
    assert sorted(zip(*np.nonzero(t["object"][0]), strict=True)) == [(0, 3), (3, 1)]
    np.testing.assert_allclose(t["xy"][0, 3, 1], [0.40 * 4 - 1, 0.75 * 4 - 3], atol=1e-6)
    np.testing.assert_allclose(t["xy"][0, 0, 3], [0.80 * 4 - 3, 0.10 * 4 - 0], atol=1e-6)
    np.testing.assert_allclose(t["sqrt_wh"][0, 3, 1], np.sqrt([0.2, 0.4]), atol=1e-6)
    np.testing.assert_allclose(t["box"][0, 3, 1], [0.30, 0.55, 0.50, 0.95], atol=1e-6)
    assert t["class"][0, 3, 1].tolist() == [0, 1, 0]
    assert t["class"][0, 0, 3].tolist() == [0, 0, 1]
    assert t["class"].sum() == 2 and t["xy"][0, 1:3].sum() == 0  # empty cells are zero


def perfect_prediction(y, grid=4, boxes=2, classes=3):
    """The model output that matches ``y`` exactly (predictor 0 responsible)."""
    from dlpipe.models.yolo.loss import encode_targets

    t = {k: as_np(v) for k, v in encode_targets(y, grid, classes).items()}
    out = np.zeros((len(y), grid, grid, 5 * boxes + classes), dtype="float32")
    out[..., 0:2] = t["xy"]
    out[..., 2:4] = t["sqrt_wh"]
    out[..., 4] = t["object"]
    out[..., 5 * boxes :] = np.where(t["object"][..., None] > 0, t["class"], 1.0 / classes)
    return out


def test_yolo_loss_is_zero_for_a_perfect_prediction_and_each_term_sees_its_error():
    from dlpipe.models.yolo.loss import yolo_loss_terms

    y = tiny_bundle().y["train"][:4]
    perfect = perfect_prediction(y)

    def terms(pred, **kw):
        out = yolo_loss_terms(y, pred, grid=4, boxes=2, num_classes=3, **kw)
        return {k: float(np.mean(as_np(v))) for k, v in out.items()}

    assert terms(perfect) == pytest.approx(dict.fromkeys(("coord", "obj", "noobj", "class"), 0.0), abs=1e-6)
    wrong = perfect.copy()
    wrong[..., 9] = 0.5  # predictor 1 claims an object everywhere
    assert terms(wrong)["noobj"] == pytest.approx(16 * 0.25)
    assert terms(wrong)["coord"] == pytest.approx(0.0, abs=1e-6)
    shifted = perfect.copy()
    shifted[..., 0] += 0.1 * (perfect[..., 4] > 0)  # every true box's x off by 0.1 cell
    objects = float(np.mean(np.sum(perfect[..., 4] > 0, axis=(1, 2))))  # occupied cells
    assert objects >= 1
    assert terms(shifted)["coord"] == pytest.approx(0.01 * objects, rel=1e-4)
    # rescoring: the obj target is the IoU of the (now shifted) box, below 1
    assert terms(shifted)["obj"] > 0 and terms(shifted, rescore=False)["obj"] == pytest.approx(0, abs=1e-6)
    swapped = perfect.copy()
    swapped[..., 10:] = perfect[..., [11, 12, 10]]  # every class probability wrong
    assert terms(swapped)["class"] == pytest.approx(2 * objects, rel=1e-4)
    assert terms(swapped, class_loss="crossentropy")["class"] > 10 * objects


def test_loss_terms_are_named_and_their_weights_change_the_loss():
    import keras

    from dlpipe.errors import DlpipeError
    from dlpipe.models.common import set_loss_weights
    from dlpipe.models.yolo.loss import LOSS_TERMS

    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert tuple(model.loss_weights) == LOSS_TERMS == ("coord", "obj", "noobj", "class")
    defaults = {k: float(as_np(v)) for k, v in model.loss_weights.items()}
    assert defaults == {"coord": 5.0, "obj": 1.0, "noobj": 0.5, "class": 1.0}
    data = tiny_bundle()
    x, y = data.x["train"][:8], data.y["train"][:8]
    y_pred = model(x)
    terms = {k: float(as_np(v)) for k, v in model.loss_terms(y, y_pred).items()}
    assert all(v > 0 for v in terms.values())

    def loss():
        return float(as_np(model.compute_loss(x, y, y_pred)))

    assert loss() == pytest.approx(sum(defaults[k] * terms[k] for k in terms), rel=1e-5)
    set_loss_weights(model, {"coord": 10.0, "noobj": 0.0})  # what train.loss_weights does
    expected = 10 * terms["coord"] + terms["obj"] + terms["class"]
    assert loss() == pytest.approx(expected, rel=1e-5)
    # each term is reported (unweighted) as <term>_loss
    reported = {m.name: float(as_np(m.result())) for m in model.metrics if m.name != "loss"}
    assert reported == pytest.approx({f"{k}_loss": v for k, v in terms.items()}, rel=1e-5)
    with pytest.raises(DlpipeError, match="no loss term"):
        set_loss_weights(model, {"kl": 1.0})


def test_yolo_output_layout_detect_and_save_reload(tmp_path):
    import keras

    from dlpipe.models.yolo.model import YOLODetector

    model = tiny_model(boxes=3, class_loss="crossentropy")
    x = tiny_bundle().x["test"]
    out = as_np(model(x))
    assert out.shape == (len(x), 4, 4, 5 * 3 + 3)
    assert out[..., :15].min() >= 0 and out[..., :15].max() <= 1
    np.testing.assert_allclose(out[..., 15:].sum(-1), 1.0, atol=1e-5)
    dets = model.detect(x, score_threshold=0.0, max_detections=5)
    assert len(dets) == len(x) and all(len(d.scores) <= 5 for d in dets)
    assert all(np.all(np.diff(d.scores) <= 0) for d in dets)

    path = tmp_path / "yolo.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, YOLODetector)
    assert (loaded.grid, loaded.boxes, loaded.class_loss) == (4, 3, "crossentropy")
    np.testing.assert_allclose(as_np(loaded(x)), out, atol=1e-5)


def test_dense_head_predicts_any_grid_from_the_whole_image():
    from dlpipe.models.yolo.loss import yolo_loss_terms

    model = tiny_model(grid=3, head="dense", dropout=0.1, batch_norm=False)  # 16 px, 3 cells
    data = tiny_bundle()
    out = model(data.x["test"])
    assert tuple(out.shape) == (len(data.x["test"]), 3, 3, 13)
    assert model.network.get_layer("predictor").__class__.__name__ == "Dense"
    terms = yolo_loss_terms(data.y["test"], out, grid=3, boxes=2, num_classes=3)
    assert all(np.all(np.isfinite(as_np(v))) for v in terms.values())


def test_yolo_rejects_a_grid_the_image_does_not_divide_into():
    from dlpipe.errors import DlpipeError
    from dlpipe.models.yolo import YOLOParams
    from dlpipe.models.yolo import model as yolo

    with pytest.raises(DlpipeError, match="power of two"):
        yolo.build(YOLOParams(grid=3, filters=[4, 8]), tiny_bundle())  # 16 px, 3 cells
    with pytest.raises(DlpipeError, match="poolings"):
        yolo.build(YOLOParams(grid=2, filters=[4]), tiny_bundle())  # 16 -> 2 takes 3
    classification = tiny_bundle()
    classification.y = {s: np.zeros(len(v), dtype="int32") for s, v in classification.x.items()}
    with pytest.raises(DlpipeError, match="padded box targets"):
        yolo.build(YOLOParams(grid=4, filters=[4, 8]), classification)


def test_detection_report_needs_a_detector():
    from dlpipe.errors import DlpipeError
    from dlpipe.stages.reports import DetectionReportParams
    from dlpipe.stages.reports.detection import detection_report

    ctx = SimpleNamespace(model=object(), data=tiny_bundle(), stage=SimpleNamespace(id="evaluate"))
    with pytest.raises(DlpipeError, match="no detect"):
        detection_report(ctx, DetectionReportParams())


def test_spec_sets_and_tunes_yolo_loss_weights_by_name(repo):
    from dlpipe.errors import SpecError
    from dlpipe.plugins import load_plugins
    from dlpipe.spec import apply_overrides, load_yaml, validate

    registry = load_plugins(plugin_dirs=[], entry_points=False).registry
    path = repo / "pipelines" / "yolo.yaml"
    spec = validate(load_yaml(path.read_text(), str(path)), registry)
    assert [s.use for s in spec.stages] == ["shapes_detection", "yolo", "keras_fit", "detection_report"]
    assert spec.stages[2].params.loss_weights["coord"] == 5.0
    doc = load_yaml(path.read_text(), str(path))
    apply_overrides(doc, ["train.loss_weights.noobj=0.25"])  # what --set and tune stages do
    assert validate(doc, registry).stages[2].params.loss_weights["noobj"] == 0.25
    doc.data["stages"].insert(3, {"kind": "tune", "use": "optuna", "params": {
        "space": {"train.loss_weights.coord": {"type": "float", "low": 1.0, "high": 10.0}},
        "objective": {"metric": "val_loss", "direction": "minimize"}, "n_trials": 2}})
    validate(doc, registry)
    doc = load_yaml(path.read_text(), str(path))
    apply_overrides(doc, ["train.loss_weights.kl=1"])
    with pytest.raises(SpecError, match="has no loss term 'kl'"):
        validate(doc, registry)


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_yolo_pipeline_logs_map_boxes_and_a_loadable_model(workdir, repo, capsys):
    import keras
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.models.yolo.model import YOLODetector
    from dlpipe.paths import default_tracking_uri

    rc = main(
        [
            "run", str(repo / "pipelines" / "yolo.yaml"),
            "--set", "data.n=300",
            "--set", "data.size=32",
            "--set", "model.grid=4",
            "--set", "model.filters=[8, 8, 16]",
            "--set", "model.head_filters=16",
            "--set", "train.epochs=2",
            "--set", "train.verbose=0",
            "--set", "train.loss_weights.coord=7",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "detection_report (test" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-detection")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("test_map50", "test_map50_95", "test_map75", "test_loss", "test_coord_loss"):
        assert key in metrics and np.isfinite(metrics[key])
    assert 0.0 <= metrics["test_map50_95"] <= metrics["test_map50"] <= 1.0
    assert {"test_ap50_circle", "test_ap50_square", "test_ap50_triangle"} <= set(metrics)
    for key in ("coord_loss", "obj_loss", "noobj_loss", "class_loss", "val_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    names = {a.path for folder in ("plots", "model")
             for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/detections.png", "plots/pr_curves.png", "plots/learning_curves.png",
            "model/model.keras"} <= names
    png = client.download_artifacts(run.info.run_id, "plots/detections.png", str(workdir))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert isinstance(model, YOLODetector) and model.grid == 4
    assert float(as_np(model.loss_weights["coord"])) == 7.0
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype("float32")
    assert len(model.detect(x)) == 3
