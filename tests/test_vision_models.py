"""The supervised-vision classifiers (dlpipe.models.mlp) and the classifier_report stage.

Parameter counts are checked against the published numbers (build only, no training);
the end-to-end test trains LeNet-5 for two epochs through the CLI.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlpipe.data import DataBundle
from dlpipe.errors import DlpipeError, SpecError
from dlpipe.plugins import load_plugins
from dlpipe.spec import apply_overrides, load_yaml, validate
from dlpipe.testing import build_architecture

HOST = load_plugins(plugin_dirs=[], entry_points=False)
MODELS = HOST.registry.models


def shape_only(input_shape, num_classes):
    """What a builder reads from the data: its input shape and class count."""
    return SimpleNamespace(input_shape=tuple(input_shape), num_classes=num_classes)


def build(name, data, **params):
    return build_architecture(HOST, name, data, example_params=False, seed=None, **params)


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


@pytest.fixture(autouse=True)
def fresh_session():
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


# --------------------------------------------------------------------------------------
# Published parameter counts
# --------------------------------------------------------------------------------------


def test_lenet5_has_the_published_parameter_count():
    model = build("lenet", shape_only((32, 32, 1), 10))
    assert model.count_params() == 61_706
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers}
    assert shapes["c1"] == (28, 28, 6) and shapes["s2"] == (14, 14, 6)
    assert shapes["c3"] == (10, 10, 16) and shapes["s4"] == (5, 5, 16)
    assert shapes["c5"] == (120,) and shapes["f6"] == (84,) and shapes["probs"] == (10,)
    assert model.get_layer("c1").activation.__name__ == "tanh"


def test_vgg16_has_the_published_parameter_count():
    model = build("vgg", shape_only((224, 224, 3), 1000), depth=16, head=[4096, 4096])
    assert model.count_params() == 138_357_544
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert len(convs) == 13 and model.get_layer("flatten").output.shape[1] == 7 * 7 * 512


def test_resnet50_has_the_published_parameter_count():
    model = build("resnet", shape_only((224, 224, 3), 1000), depth=50)
    # The paper/torchvision count; Keras also counts the batch-norm moving statistics.
    assert trainable_count(model) == 25_557_032
    assert model.count_params() == 25_557_032 + 53_120
    assert model.get_layer("avg_pool").output.shape[1] == 2048


def test_variants_build_and_adapt_to_small_inputs():
    digits = shape_only((8, 8, 1), 10)
    # every VGG depth has its number of weight layers
    for depth in (11, 13, 16, 19):
        model = build("vgg", digits, depth=depth, width=0.0625, head=[8, 8])
        weighted = [layer for layer in model.layers if layer.__class__.__name__ in ("Conv2D", "Dense")]
        assert len(weighted) == depth
    # pooling stops at 1x1 instead of failing
    vgg11 = build("vgg", digits, depth=11, width=0.0625, head=[])
    pools = [layer for layer in vgg11.layers if layer.__class__.__name__ == "MaxPooling2D"]
    assert [p.name for p in pools] == ["block1_pool", "block2_pool", "block3_pool"]  # 8 -> 1
    assert vgg11.get_layer("flatten").output.shape[1] == 512 // 16
    # ResNet-34 basic blocks vs bottlenecks; the small stem keeps 8x8
    r34 = build("resnet", digits, depth=34, width=0.0625, stem="small")
    assert sum(1 for layer in r34.layers if layer.name.endswith("_add")) == 16
    assert r34.get_layer("stem_conv").output.shape[1:3] == (8, 8)
    # MobileNet: grouped pointwise convolutions and dilation past the output stride
    mobile = build("mobilenet", shape_only((32, 32, 3), 5), width=0.25, groups=4, output_stride=8)
    pointwise = mobile.get_layer("block13_pw")
    assert pointwise.groups == 4 and pointwise.kernel.shape == (1, 1, 256 // 4, 256)
    assert mobile.get_layer("block12_dw").dilation_rate == (2, 2)
    assert mobile.get_layer("block13_dw").output.shape[1:3] == (4, 4)  # 32 / 8
    plain = build("mobilenet", shape_only((32, 32, 3), 5), width=0.25)
    assert plain.get_layer("block13_dw").output.shape[1:3] == (2, 2)  # 32 / 16 (stem stride 1)
    assert plain.count_params() > mobile.count_params()  # groups save pointwise weights
    # AlexNet: overlapping 3x3 stride-2 max pooling, skipped once the map is too small
    alex = build("alexnet", shape_only((32, 32, 1), 10), width=0.125, head=[32, 32])
    pools = [layer for layer in alex.layers if layer.__class__.__name__ == "MaxPooling2D"]
    assert [(p.pool_size, p.strides) for p in pools] == [((3, 3), (2, 2))] * 3
    small = build("alexnet", digits, width=0.125, head=[8])  # 8 -> 3 -> 1, then no pool5
    assert [layer.name for layer in small.layers if layer.name.startswith("pool")] == ["pool1", "pool2"]
    assert small.get_layer("conv5_relu").output.shape[1:3] == (1, 1)
    # MLP on a table (iris, XOR): no flatten needed, batch norm on request
    xor = build("mlp", shape_only((2,), 2), hidden=[4], norm="batch")
    assert xor.output.shape[1] == 2 and xor.get_layer("batch_norm_0") is not None


def test_too_small_or_wrong_inputs_are_clear_errors():
    with pytest.raises(DlpipeError, match=r"image_size: \[32, 32\]"):
        build("lenet", shape_only((8, 8, 1), 10), padding="valid")
    with pytest.raises(DlpipeError, match=r"image_size: \[64, 64\]"):
        build("alexnet", shape_only((8, 8, 1), 10), stem="imagenet")
    with pytest.raises(DlpipeError, match="needs images"):
        build("resnet", shape_only((4,), 3))
    with pytest.raises(DlpipeError, match="at least 2 classes"):
        build("mlp", shape_only((4,), None))


# --------------------------------------------------------------------------------------
# Inception: auxiliary classifiers as named loss terms
# --------------------------------------------------------------------------------------


def tiny_inception():
    return build("inception", shape_only((8, 8, 1), 4), width=0.0625, blocks=[1, 2, 1])


def test_inception_aux_loss_weights_are_named_and_change_the_loss():
    from dlpipe.models.common import set_loss_weights
    from dlpipe.models.inception.model import crossentropy

    model = tiny_inception()
    assert set(model.loss_weights) == set(MODELS["inception"].loss_weights) == {"main", "aux1", "aux2"}
    assert float(model.loss_weights["aux1"].numpy()) == pytest.approx(0.3)

    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 4, 6).astype("int32")
    heads = model(x, training=True)
    assert isinstance(heads, tuple) and len(heads) == 3
    assert model(x).shape == (6, 4)  # inference: the main head only
    ce = [float(crossentropy(y, h)) for h in heads]

    def loss(**weights):
        set_loss_weights(model, weights)
        return float(model.compute_loss(x, y, heads, training=True))

    assert loss(main=1.0, aux1=0.0, aux2=0.0) == pytest.approx(ce[0], rel=1e-5)
    assert loss(main=1.0, aux1=2.0, aux2=0.0) == pytest.approx(ce[0] + 2 * ce[1], rel=1e-5)
    assert loss(main=0.5, aux1=0.3, aux2=0.7) == pytest.approx(
        0.5 * ce[0] + 0.3 * ce[1] + 0.7 * ce[2], rel=1e-5
    )
    # evaluation is the main head's cross-entropy, whatever the weights
    assert float(model.compute_loss(x, y, heads[0], training=False)) == pytest.approx(ce[0], rel=1e-5)
    with pytest.raises(DlpipeError, match="aux3"):
        set_loss_weights(model, {"aux3": 1.0})


def test_inception_round_trips_through_keras_saving(tmp_path):
    import keras

    from dlpipe.models.common import set_loss_weights

    model = tiny_inception()
    set_loss_weights(model, {"aux2": 0.9})
    x = np.random.default_rng(1).random((3, 8, 8, 1)).astype("float32")
    model.save(tmp_path / "inception.keras")
    loaded = keras.saving.load_model(tmp_path / "inception.keras")
    assert type(loaded).__name__ == "InceptionClassifier"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert float(loaded.loss_weights["aux2"].numpy()) == pytest.approx(0.9)


def test_spec_sets_inception_aux_weights_by_name():
    text = """\
name: aux
stages:
  - {kind: data, use: sklearn_digits, params: {image_size: [16, 16]}}
  - {kind: model, use: inception, params: {width: 0.0625}}
  - {kind: train, use: keras_fit, params: {loss_weights: {aux1: 0.5, aux2: 0.1}}}
  - {kind: evaluate, use: classifier_report}
"""
    spec = validate(load_yaml(text, "aux.yaml"), HOST.registry)
    assert spec.stages[2].params.loss_weights == {"aux1": 0.5, "aux2": 0.1}
    doc = load_yaml(text, "aux.yaml")
    apply_overrides(doc, ["train.loss_weights.aux1=0.05"])  # what --set and tune stages do
    tuned = validate(doc, HOST.registry)
    assert tuned.stages[2].params.loss_weights["aux1"] == 0.05
    with pytest.raises(SpecError, match="has no loss term 'aux3'"):
        validate(load_yaml(text.replace("aux2: 0.1", "aux3: 0.1"), "aux.yaml"), HOST.registry)


# --------------------------------------------------------------------------------------
# classifier_report
# --------------------------------------------------------------------------------------


class FakeContext:
    """The parts of dlpipe.context.RunContext that an evaluate stage uses."""

    def __init__(self, model, data, run_dir, history=None):
        self.model, self.data, self.run_dir = model, data, Path(run_dir)
        self.history = history or {}
        self.stage = SimpleNamespace(id="evaluate", kind="evaluate", use="classifier_report")
        self.metrics = {}
        self.files = {}

    def model_entry(self):
        return MODELS["mlp"]

    def log_metrics(self, metrics, step=None):
        assert step is None
        self.metrics.update({k: float(v) for k, v in metrics.items()})

    def log_figure(self, figure, filename, artifact_path="plots"):
        import matplotlib.pyplot as plt

        out = self.run_dir / artifact_path / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=60)
        plt.close(figure)
        self.files[filename] = out
        return out


def bundle(x, y, class_names, seed=0):
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    return DataBundle(
        x={"train": x_train, "val": x_test[:0], "test": x_test},
        y={"train": y_train, "val": y_test[:0], "test": y_test},
        num_classes=len(class_names),
        class_names=class_names,
    )


def trained_mlp(data, epochs):
    import keras

    model = build("mlp", data, hidden=[32], dropout=0.0)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(data.dataset("train", 32, shuffle=True), epochs=epochs, verbose=0, shuffle=False)
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def run_report(ctx, **params):
    from dlpipe.stages.reports import ClassifierReportParams
    from dlpipe.stages.reports.classifier import classifier_report

    classifier_report(ctx, ClassifierReportParams(**params))


def test_classifier_report_on_digits(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:600] / 16.0).astype("float32")[..., None]
    data = bundle(x, digits.target[:600].astype("int32"), [str(i) for i in range(10)])
    model, history = trained_mlp(data, epochs=2)
    ctx = FakeContext(model, data, tmp_path, history)
    run_report(ctx, worst=12)

    m = ctx.metrics
    predicted = model.predict(data.x["test"], verbose=0).argmax(axis=1)
    assert m["test_accuracy"] == pytest.approx(np.mean(predicted == data.y["test"]))
    assert 0.3 < m["test_accuracy"] <= 1.0 and m["test_loss"] > 0
    for k in range(10):
        assert 0.0 <= m[f"test_precision_{k}"] <= 1.0 and 0.0 <= m[f"test_recall_{k}"] <= 1.0
    true3 = data.y["test"] == 3
    assert m["test_recall_3"] == pytest.approx(np.mean(predicted[true3] == 3))
    assert m["test_recall_macro"] == pytest.approx(np.mean([m[f"test_recall_{k}"] for k in range(10)]))
    assert "test_roc_auc" not in m
    assert set(ctx.files) == {"learning_curves.png", "confusion_matrix.png", "misclassified.png"}
    for path in ctx.files.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_misclassified_grid_shows_the_most_confident_mistakes_first():
    from dlpipe.stages.reports.classifier import misclassified_figure

    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([
        [0.1, 0.8, 0.1],  # wrong, 0.8
        [0.1, 0.9, 0.0],  # right
        [0.6, 0.3, 0.1],  # wrong, 0.6
        [0.0, 0.05, 0.95],  # wrong, 0.95
        [0.2, 0.7, 0.1],  # right
        [0.5, 0.4, 0.1],  # wrong, 0.5
    ])
    fig = misclassified_figure(np.zeros((6, 4, 4, 1)), y, probs, ["a", "b", "c"], count=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true a\npred c (0.95)", "true a\npred b (0.80)", "true c\npred a (0.60)"]


def test_class_probabilities_accepts_logits_and_sigmoids():
    from dlpipe.stages.reports.classifier import class_probabilities

    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    p = class_probabilities(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert list(p.argmax(axis=1)) == [0, 1]
    sigmoid = class_probabilities(np.array([[0.2], [0.9]]))
    np.testing.assert_allclose(sigmoid, [[0.8, 0.2], [0.1, 0.9]])
    softmax = np.array([[0.7, 0.3]])
    np.testing.assert_allclose(class_probabilities([softmax, softmax * 0]), softmax)


def test_classifier_report_binary_writes_roc_and_pr(tmp_path):
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer()
    x = cancer.data.astype("float32")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    data = bundle(x, cancer.target.astype("int32"), list(cancer.target_names))
    model, _ = trained_mlp(data, epochs=3)
    ctx = FakeContext(model, data, tmp_path)
    run_report(ctx)

    m = ctx.metrics
    assert m["test_roc_auc"] > 0.9 and 0.0 < m["test_average_precision"] <= 1.0
    assert {"test_precision_0", "test_precision_1", "test_recall_0", "test_recall_1"} <= set(m)
    assert {"confusion_matrix.png", "misclassified.png", "roc_curve.png", "pr_curve.png"} == set(ctx.files)
    for path in ctx.files.values():
        assert path.stat().st_size > 1000


def test_classifier_report_needs_labels(tmp_path):
    data = DataBundle(x={"train": np.zeros((4, 2)), "test": np.zeros((4, 2))},
                      y={"train": None, "test": None}, num_classes=2)
    with pytest.raises(DlpipeError, match="no labels"):
        run_report(FakeContext(object(), data, tmp_path))


# --------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lenet_pipeline_end_to_end(workdir, repo, capsys):
    import keras
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(["run", str(repo / "pipelines" / "lenet.yaml"), "--set", "train.epochs=2",
               "--set", "train.verbose=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "classifier_report (test" in out and "FINISHED" in out

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-vision")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.activation"] == "tanh"
    metrics = run.data.metrics
    assert metrics["test_accuracy"] > 0.5
    assert {f"test_precision_{k}" for k in range(10)} <= set(metrics)
    assert {f"test_recall_{k}" for k in range(10)} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
    names = {a.path for folder in ("plots", "model")
             for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/confusion_matrix.png", "plots/misclassified.png",
            "plots/learning_curves.png", "model/model.keras"} <= names

    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    assert model.count_params() == 61_706
    from sklearn.datasets import load_digits

    from dlpipe.data import resize_images

    digits = load_digits()
    x = resize_images(digits.images[:300, :, :, None].astype("float32"), (32, 32))
    x = x / x.max()
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(axis=1) == digits.target[:300]) > 0.5


def test_pipelines_validate():
    for name in ("lenet", "resnet", "vgg", "mobilenet", "inception", "alexnet", "mlp_iris"):
        path = Path(__file__).resolve().parent.parent / "pipelines" / f"{name}.yaml"
        spec = validate(load_yaml(path.read_text(), str(path)), HOST.registry)
        uses = [s.use for s in spec.stages]
        assert uses[-1] == "classifier_report" and re.sub(r"_iris$", "", name) in uses
