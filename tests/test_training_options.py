"""Training options of the keras_fit stage: optimizers, schedules, losses,
regularization, instance norm, class balancing, clipping, early stopping, best-weight
restore, per-sample weights, and the XOR pipeline (one layer fails, two succeed)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from dlpipe.data import DataBundle
from dlpipe.engine import run_pipeline
from dlpipe.errors import DlpipeError
from dlpipe.spec import SpecError, apply_overrides, load_yaml, validate
from dlpipe.stages.train import KerasFitParams, LossParams, OptimizerParams

# ------------------------------------------------------------------------ helpers

XOR_DATA = {"kind": "data", "use": "xor", "params": {"repeats": 16, "noise": 0.05}}
TINY_MLP = {"kind": "model", "use": "mlp", "params": {"hidden": [4], "activation": "tanh", "dropout": 0.0}}
QUIET = {"verbose": 0, "resume": False, "save_model": False, "checkpoint": {"enabled": False}}


def spec_of(host, stages, seed=0):
    doc = {"name": "t", "experiment": "tests", "seed": seed,
           "tracking": {"enabled": False}, "stages": stages}
    return validate(load_yaml(yaml.safe_dump(doc, sort_keys=False), "t.yaml"), host.registry)


def run_stages(host, stages, seed=0):
    """Run a spec through the real engine (tracking off); return the RunContext."""
    return run_pipeline(spec_of(host, stages, seed), host)


def train_stage(**params):
    return {"kind": "train", "use": "keras_fit", "params": {**QUIET, **params}}


def fit_params(**kw):
    return KerasFitParams.model_validate(kw)


def numpy_ce(targets, probs):
    return -np.sum(targets * np.log(probs), axis=-1)


def one_hot(labels, classes):
    return np.eye(classes, dtype="float32")[labels]


@pytest.fixture(scope="module")
def probs_and_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = np.array([0, 1, 2, 2, 1, 0], dtype="int32")
    return logits, probs.astype("float32"), labels


def loss_value(loss, y_true, y_pred, sample_weight=None):
    import keras

    if isinstance(loss, str):  # a Keras loss function by name: per-example values
        assert sample_weight is None
        return float(np.mean(keras.losses.get(loss)(y_true, y_pred)))
    return float(loss(y_true, y_pred, sample_weight=sample_weight))


def make_loss_of(num_classes=3, labels=None, **spec):
    from dlpipe.losses import make_loss

    return make_loss(LossParams.model_validate(spec), num_classes=num_classes, train_labels=labels)


# ------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"])
def test_every_optimizer_builds_and_trains_from_a_spec(host, workdir, name):
    extra = {
        "adam": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6},
        "adamw": {"beta_1": 0.85, "weight_decay": 1e-3},
        "nadam": {"beta_2": 0.95},
        "sgd": {"momentum": 0.9, "nesterov": True},
        "rmsprop": {"momentum": 0.5, "epsilon": 1e-5},
        "adagrad": {"epsilon": 1e-6},
    }[name]
    stages = [XOR_DATA, TINY_MLP,
              train_stage(epochs=1, batch_size=16, optimizer={"name": name, "learning_rate": 0.01, **extra})]
    ctx = run_stages(host, stages)
    opt = ctx.model.optimizer
    assert type(opt).__name__.lower() == name
    assert int(opt.iterations.numpy()) == math.ceil(ctx.data.size("train") / 16)
    assert math.isfinite(ctx.history["loss"][0])
    for key, value in extra.items():
        assert getattr(opt, key) == pytest.approx(value), key


def test_betas_are_only_for_the_adam_family():
    with pytest.raises(ValueError, match="only adam, adamw and nadam"):
        OptimizerParams(name="sgd", beta_1=0.5)
    with pytest.raises(ValueError, match="sgd has no epsilon"):
        OptimizerParams(name="sgd", epsilon=1e-3)


# -------------------------------------------------------------------- schedules


def lr_at(schedule, step):
    import keras

    return float(keras.ops.convert_to_numpy(schedule(step))) if callable(schedule) else float(schedule)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (None, {0: 0.1, 57: 0.1}),
        ({"name": "cosine", "alpha": 0.1}, {0: 0.1, 50: 0.1 * (0.1 + 0.9 * 0.5), 100: 0.01}),
        ({"name": "exponential", "decay_rate": 0.5, "decay_epochs": 2},
         {0: 0.1, 10: 0.1 * 0.5 ** 0.5, 40: 0.025}),
        ({"name": "step", "decay_rate": 0.5, "decay_epochs": 2}, {19: 0.1, 20: 0.05, 45: 0.025}),
        ({"name": "cosine", "warmup_epochs": 1},  # 10 warm-up steps, then 90 of cosine
         {0: 0.01, 4: 0.05, 10: 0.1, 55: 0.05, 100: 0.0}),
        ({"name": "constant", "warmup_epochs": 0.5}, {0: 0.02, 4: 0.1, 5: 0.1, 80: 0.1}),
    ],
)
def test_schedule_learning_rate_at_chosen_steps(schedule, expected):
    from dlpipe.stages.train.fit import learning_rate

    opt = OptimizerParams(learning_rate=0.1, schedule=schedule)
    lr = learning_rate(opt, steps_per_epoch=10, epochs=10)
    for step, value in expected.items():
        assert lr_at(lr, step) == pytest.approx(value, rel=1e-5, abs=1e-7), step


# ------------------------------------------------------------------------ losses


def test_plain_loss_names_still_work_and_mean_keras(host):
    from dlpipe.losses import make_loss

    params = fit_params(loss="mse")
    assert params.loss.name == "mse" and make_loss(params.loss) == "mse"
    assert make_loss(fit_params(loss="sparse_categorical_crossentropy").loss) == "sparse_categorical_crossentropy"
    assert make_loss(fit_params(loss="kl_divergence").loss) == "kl_divergence"
    with pytest.raises(ValueError, match="did you mean: mse"):
        fit_params(loss="msee")
    with pytest.raises(ValueError, match="gamma do not apply to loss 'mse'"):
        fit_params(loss={"name": "mse", "gamma": 2})
    with pytest.raises(ValueError, match="delta do not apply"):
        fit_params(loss={"name": "categorical_crossentropy", "delta": 2})
    # a typo in a structured loss is reported at its key, with suggestions
    with pytest.raises(SpecError, match=r"(?s)train\.loss\.label_smothing.*did you mean: label_smoothing"):
        spec_of(host, [XOR_DATA, TINY_MLP, train_stage(loss={"name": "mae", "label_smothing": 0.1})])


def test_regression_losses_against_numpy():
    y = np.array([[0.0], [1.0], [2.0], [5.0]], dtype="float32")
    p = np.array([[0.5], [1.2], [-1.0], [5.1]], dtype="float32")
    err = p - y
    assert loss_value(make_loss_of(name="mse"), y, p) == pytest.approx(np.mean(err**2), rel=1e-5)
    assert loss_value(make_loss_of(name="mae"), y, p) == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
    for delta in (0.5, 2.0):
        a = np.abs(err)
        ref = np.mean(np.where(a <= delta, 0.5 * a**2, delta * (a - 0.5 * delta)))
        assert loss_value(make_loss_of(name="huber", delta=delta), y, p) == pytest.approx(ref, rel=1e-5)


def test_sparse_label_smoothing_against_numpy(probs_and_labels):
    _, probs, labels = probs_and_labels
    s = 0.2
    targets = one_hot(labels, 3) * (1 - s) + s / 3
    ref = np.mean(numpy_ce(targets, probs))
    sparse = make_loss_of(name="sparse_categorical_crossentropy", label_smoothing=s)
    assert loss_value(sparse, labels, probs) == pytest.approx(ref, rel=1e-5)
    assert loss_value(sparse, labels[:, None], probs) == pytest.approx(ref, rel=1e-5)  # (n, 1) labels
    dense = make_loss_of(name="categorical_crossentropy", label_smoothing=s)
    assert loss_value(dense, one_hot(labels, 3), probs) == pytest.approx(ref, rel=1e-5)
    # and Keras agrees for one-hot targets
    assert loss_value(dense, one_hot(labels, 3), probs) == pytest.approx(
        loss_value(__import__("keras").losses.CategoricalCrossentropy(label_smoothing=s),
                   one_hot(labels, 3), probs), rel=1e-5)
    # binary: targets move towards 0.5
    y = np.array([[0.0], [1.0], [1.0]], dtype="float32")
    p = np.array([[0.2], [0.7], [0.99]], dtype="float32")
    t = y * (1 - s) + s / 2
    ref = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    assert loss_value(make_loss_of(name="binary_crossentropy", label_smoothing=s), y, p) == pytest.approx(ref, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy(probs_and_labels):
    import keras

    logits, probs, labels = probs_and_labels
    ce = float(keras.losses.sparse_categorical_crossentropy(labels, probs).numpy().mean())
    for name, y in (("sparse_categorical_focal_crossentropy", labels),
                    ("categorical_focal_crossentropy", one_hot(labels, 3))):
        assert loss_value(make_loss_of(name=name, gamma=0.0), y, probs) == pytest.approx(ce, rel=1e-5)
    yb = (labels[:, None] == 1).astype("float32")
    pb = probs[:, 1:2]
    bce = float(keras.losses.binary_crossentropy(yb, pb).numpy().mean())
    assert loss_value(make_loss_of(name="binary_focal_crossentropy", gamma=0.0), yb, pb) == pytest.approx(bce, rel=1e-5)
    # from_logits gives the same values from logits
    from_logits = make_loss_of(name="sparse_categorical_focal_crossentropy", gamma=0.0, from_logits=True)
    assert loss_value(from_logits, labels, logits) == pytest.approx(ce, rel=1e-5)


def test_focal_gamma_two_against_numpy_and_keras(probs_and_labels):
    import keras

    _, probs, labels = probs_and_labels
    t = one_hot(labels, 3)
    ref = np.mean(np.sum(-0.25 * (1 - probs) ** 2 * t * np.log(probs), axis=-1))
    mine = make_loss_of(name="sparse_categorical_focal_crossentropy", gamma=2.0, alpha=0.25)
    assert loss_value(mine, labels, probs) == pytest.approx(ref, rel=1e-5)
    theirs = keras.losses.CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0)
    assert loss_value(theirs, t, probs) == pytest.approx(ref, rel=1e-5)
    # binary focal with alpha balancing, against NumPy and Keras
    y = np.array([[0.0], [1.0], [1.0], [0.0]], dtype="float32")
    p = np.array([[0.1], [0.6], [0.95], [0.7]], dtype="float32")
    ref = np.mean(-(0.25 * y * (1 - p) ** 2 * np.log(p) + 0.75 * (1 - y) * p**2 * np.log(1 - p)))
    mine = make_loss_of(name="binary_focal_crossentropy", alpha=0.25)  # gamma defaults to 2
    assert loss_value(mine, y, p) == pytest.approx(ref, rel=1e-5)
    theirs = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.25, gamma=2.0)
    assert loss_value(theirs, y, p) == pytest.approx(ref, rel=1e-5)


def test_class_weighted_loss_against_numpy(probs_and_labels):
    _, probs, labels = probs_and_labels
    weights = np.array([1.0, 3.0, 0.5])
    ref = np.mean(weights[labels] * numpy_ce(one_hot(labels, 3), probs))
    listed = make_loss_of(name="sparse_categorical_crossentropy", class_weights=[1.0, 3.0, 0.5])
    assert loss_value(listed, labels, probs) == pytest.approx(ref, rel=1e-5)
    mapped = make_loss_of(name="categorical_crossentropy", class_weights={1: 3.0, 2: 0.5})
    assert loss_value(mapped, one_hot(labels, 3), probs) == pytest.approx(ref, rel=1e-5)
    # 'balanced' from training labels: 4 of class 0, 2 of class 1 -> 6/(2*4), 6/(2*2)
    balanced = make_loss_of(num_classes=2, labels=np.array([0, 0, 0, 0, 1, 1]),
                            name="binary_crossentropy", class_weights="balanced")
    assert balanced.class_weights == pytest.approx([0.75, 1.5])
    y = np.array([[0.0], [1.0]], dtype="float32")
    p = np.array([[0.3], [0.6]], dtype="float32")
    ref = np.mean([0.75 * -np.log(0.7), 1.5 * -np.log(0.6)])
    assert loss_value(balanced, y, p) == pytest.approx(ref, rel=1e-5)
    # keras sample weights still multiply on top
    sw = np.array([2.0, 0.0], dtype="float32")
    assert loss_value(balanced, y, p, sample_weight=sw) == pytest.approx(0.75 * -np.log(0.7), rel=1e-5)


def test_custom_losses_save_and_reload(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    loss = make_loss_of(name="sparse_categorical_focal_crossentropy", gamma=1.5, alpha=0.5,
                        label_smoothing=0.1, class_weights=[1, 2, 3])
    model.compile(optimizer="adam", loss=loss)
    x, y = np.random.default_rng(0).random((8, 2)).astype("float32"), np.arange(8) % 3
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert type(again.loss).__name__ == "CategoricalLoss"
    assert again.loss.get_config() == loss.get_config()
    assert again.evaluate(x, y, verbose=0) == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-5)


# ---------------------------------------------------------------- sample weights


def test_npz_weight_key_and_weighted_dataset(host, workdir):
    n = 40
    x = np.arange(n, dtype="float32")[:, None]
    np.savez(workdir / "w.npz", x=x, y=np.arange(n) % 2, w=np.arange(n, dtype="float32"))
    stages = [{"kind": "data", "use": "npz",
               "params": {"path": "w.npz", "weight_key": "w", "normalize": "none", "limit": 30}}]
    ctx = run_stages(host, stages)
    data = ctx.data
    for split in ("train", "val", "test"):  # weights stay aligned through limit and split
        np.testing.assert_array_equal(data.weights[split], data.x[split][:, 0])
    batch = next(iter(data.dataset("train", 64)))
    assert len(batch) == 3
    np.testing.assert_array_equal(batch[2].numpy(), data.weights["train"])
    # Keras weights each example's loss by w
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy")
    probs = model.predict(data.x["test"], verbose=0)
    per_example = -np.log(probs[np.arange(len(probs)), data.y["test"]])
    ref = np.sum(per_example * data.weights["test"]) / len(probs)
    assert model.evaluate(data.dataset("test", 64), verbose=0) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(DlpipeError, match="no array named 'wt'.*did you mean: w"):
        run_stages(host, [{"kind": "data", "use": "npz", "params": {"path": "w.npz", "weight_key": "wt"}}])


# ------------------------------------------------------------------ regularization


def small_model():
    import keras

    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(2, 3, name="conv_a")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(4, activation="relu", name="dense_a")(h)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs)


def rule(layers, l1=0.0, l2=0.0):
    return SimpleNamespace(layers=layers, l1=l1, l2=l2)


def test_regularization_adds_to_the_loss_and_scales_with_the_factor(tmp_path):
    import keras

    from dlpipe.stages.train.fit import apply_regularization

    rng = np.random.default_rng(0)
    x, y = rng.random((16, 6, 6, 1)).astype("float32"), rng.integers(0, 2, 16)

    def loss_with(rules):
        keras.utils.set_random_seed(1)
        model = small_model()
        applied = apply_regularization(model, rules) if rules else {}
        model.compile(loss="sparse_categorical_crossentropy")
        return model, applied, model.evaluate(x, y, verbose=0)

    _, _, plain = loss_with([])
    model, applied, l2_loss = loss_with([rule("DENSE*", l2=0.01)])  # class names, any case
    assert sorted(applied) == ["dense_a", "head"]
    dense_sq = sum(float(np.sum(model.get_layer(n).kernel.numpy() ** 2)) for n in ("dense_a", "head"))
    assert len(model.losses) == 2
    assert l2_loss - plain == pytest.approx(0.01 * dense_sq, rel=1e-4)
    _, _, double = loss_with([rule("DENSE*", l2=0.02)])
    assert double - plain == pytest.approx(2 * (l2_loss - plain), rel=1e-4)
    # by layer name; the last matching rule wins; l1 counts |w|
    model, applied, mixed = loss_with([rule("*", l2=1.0), rule("conv*", l1=0.1), rule("head")])
    assert sorted(applied) == ["conv_a", "dense_a"]
    conv_abs = float(np.sum(np.abs(model.get_layer("conv_a").kernel.numpy())))
    dense_sq = float(np.sum(model.get_layer("dense_a").kernel.numpy() ** 2))
    assert mixed - plain == pytest.approx(0.1 * conv_abs + 1.0 * dense_sq, rel=1e-4)
    # the penalty is in the layer config, so a saved model reloads with it
    model.save(tmp_path / "r.keras")
    again = keras.models.load_model(tmp_path / "r.keras", compile=False)
    assert len(again.losses) == 2
    assert again.get_layer("conv_a").get_config()["kernel_regularizer"]["config"]["l1"] == pytest.approx(0.1)
    with pytest.raises(DlpipeError, match=r"'lstm\*' matches no layer.*conv_a \(Conv2D\)"):
        apply_regularization(small_model(), [rule("lstm*", l2=1.0)])


def test_regularization_through_the_train_stage(host, workdir):
    stages = [XOR_DATA, TINY_MLP,
              train_stage(epochs=1, regularization=[{"layers": "dense*", "l2": 0.5}])]
    ctx = run_stages(host, stages)
    assert len(ctx.model.losses) == 2  # dense_0 and the output layer (Dense class)
    penalty = sum(float(v.numpy()) for v in ctx.model.losses)
    kernels = [ctx.model.get_layer(n).kernel.numpy() for n in ("dense_0", "probs")]
    assert penalty == pytest.approx(0.5 * sum(float(np.sum(k**2)) for k in kernels), rel=1e-5)


# ------------------------------------------------------------------ normalization


def test_instance_norm_normalizes_each_sample_and_channel(tmp_path):
    import keras

    from dlpipe.models.common import InstanceNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 5, 4)) * np.array([1, 10, 0.1, 3]) + np.array([5, -2, 0, 100])
    x = x.astype("float32")
    layer = InstanceNormalization(epsilon=1e-5)
    out = layer(x).numpy()
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-3)
    assert [tuple(w.shape) for w in layer.trainable_weights] == [(4,), (4,)]
    # one sample's statistics do not depend on the rest of the batch
    np.testing.assert_allclose(layer(x[:1]).numpy(), out[:1], rtol=1e-5, atol=1e-5)
    # a flat vector: normalized over its features
    flat = x.reshape(3, -1)
    out = InstanceNormalization()(flat).numpy()
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=1), 1.0, atol=1e-3)
    # serializable: a model with the layer saves and reloads
    model = keras.Sequential([keras.Input((5, 5, 4)), InstanceNormalization(epsilon=1e-3, center=False)])
    model.save(tmp_path / "in.keras")
    again = keras.models.load_model(tmp_path / "in.keras")
    assert again.layers[0].get_config()["epsilon"] == 1e-3 and again.layers[0].beta is None
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_mlp_and_lenet_norm_options(host, tmp_path):
    import keras

    from dlpipe.testing import check_architecture, synthetic_bundle

    data = synthetic_bundle("classification", n=16, num_classes=3)
    expected = {"batch": {"BatchNormalization"}, "instance": {"InstanceNormalization"},
                "layer": {"LayerNormalization", "GroupNormalization"}}
    norms = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
    x = data.x["test"][:4]
    for name, example in (("mlp", {"hidden": [8]}), ("lenet", {"filters": [2, 4], "units": [8, 8]})):
        entry = host.registry.models[name]
        for norm, kinds in expected.items():
            model = entry.builder()(entry.params(**example, norm=norm), data)
            found = {type(layer).__name__ for layer in model.layers} & norms
            assert len(found) == 1 and found <= kinds, (name, norm, found)
        # instance norm trains a step (the conformance harness), saves and reloads
        entry = dataclasses.replace(entry, example_params={**example, "norm": "instance"})
        model = check_architecture(entry, data)
        model.save(tmp_path / f"{name}.keras")
        np.testing.assert_allclose(keras.models.load_model(tmp_path / f"{name}.keras").predict(x, verbose=0),
                                   model.predict(x, verbose=0), atol=1e-5)


def test_lenet_default_keeps_the_published_parameter_count(host):
    entry = host.registry.models["lenet"]
    data = SimpleNamespace(input_shape=(32, 32, 1), num_classes=10)
    model = entry.builder()(entry.params(), data)
    assert model.count_params() == 61_706
    assert entry.params().norm == "none"


# ----------------------------------------------------------------- class balance


def labelled_bundle(counts, weights=None):
    y = np.concatenate([np.full(c, i) for i, c in enumerate(counts)]).astype("int32")
    x = np.arange(len(y), dtype="float32")[:, None]
    empty = np.zeros((0, 1), "float32")
    return DataBundle(
        x={"train": x, "val": empty, "test": empty},
        y={"train": y, "val": y[:0], "test": y[:0]},
        num_classes=len(counts), class_names=["cat", "dog", "eel"][: len(counts)],
        weights={} if weights is None else {"train": weights},
    )


def test_class_weight_balanced_and_by_name():
    from dlpipe.stages.train.fit import balanced_training_data

    data = labelled_bundle([6, 3, 1])
    out = balanced_training_data(data, fit_params(class_weight="balanced"), seed=0)
    expected = np.array([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    np.testing.assert_allclose(out.weights["train"], expected[data.y["train"]], rtol=1e-6)
    # each class now carries the same total weight
    totals = np.bincount(data.y["train"], weights=out.weights["train"])
    np.testing.assert_allclose(totals, totals[0], rtol=1e-6)
    # by class name or index; multiplies the data's own weights; other splits untouched
    own = np.full(10, 2.0, dtype="float32")
    out = balanced_training_data(labelled_bundle([6, 3, 1], own), fit_params(class_weight={"eel": 5, 1: 0.5}), 0)
    np.testing.assert_allclose(out.weights["train"], 2.0 * np.array([1, 0.5, 5])[data.y["train"]])
    assert out.x["train"] is data.x["train"] or np.array_equal(out.x["train"], data.x["train"])
    with pytest.raises(DlpipeError, match="class_weight"):
        balanced_training_data(data, fit_params(class_weight={"emu": 2}), 0)


def test_oversampling_balances_counts_with_a_seed():
    from dlpipe.stages.train.fit import balanced_training_data, oversample_indices

    labels = np.array([0] * 30 + [1] * 5 + [2] * 10)
    index = oversample_indices(labels, seed=3)
    assert np.bincount(labels[index]).tolist() == [30, 30, 30]
    assert set(range(len(labels))) <= set(index.tolist())  # every original example kept
    np.testing.assert_array_equal(index, oversample_indices(labels, seed=3))
    assert not np.array_equal(index, oversample_indices(labels, seed=4))
    # in the train stage: x, y and the data's weights move together
    data = labelled_bundle([8, 2], weights=np.arange(10, dtype="float32"))
    out = balanced_training_data(data, fit_params(oversample=True), seed=0)
    assert np.bincount(out.y["train"]).tolist() == [8, 8]
    np.testing.assert_array_equal(out.x["train"][:, 0], out.weights["train"])
    np.testing.assert_array_equal(data.y["train"][out.x["train"][:, 0].astype(int)], out.y["train"])


# --------------------------------------------------------- clipping, early stopping


def test_gradient_clipping_is_configured_and_clips():
    import keras

    from dlpipe.stages.train.fit import make_optimizer

    def step(**clip):
        opt = make_optimizer(OptimizerParams(name="sgd", learning_rate=1.0, **clip), 1, 1)
        var = keras.Variable(np.zeros(3, dtype="float32"))
        opt.apply([keras.ops.convert_to_tensor(np.array([3.0, -4.0, 0.001], "float32"))], [var])
        return opt, var.numpy()

    opt, moved = step(clipvalue=0.5)
    assert opt.clipvalue == 0.5
    np.testing.assert_allclose(moved, [-0.5, 0.5, -0.001], rtol=1e-5)
    opt, moved = step(clipnorm=1.0)
    assert opt.clipnorm == 1.0
    np.testing.assert_allclose(np.linalg.norm(moved), 1.0, rtol=1e-4)
    opt, moved = step(global_clipnorm=0.5)
    assert opt.global_clipnorm == 0.5
    np.testing.assert_allclose(moved, -0.5 * np.array([3.0, -4.0, 0.001]) / np.linalg.norm([3, 4, 0.001]), rtol=1e-4)


def test_early_stopping_stops(host, workdir):
    stages = [XOR_DATA, TINY_MLP,
              train_stage(epochs=30, early_stopping={"monitor": "loss", "patience": 2, "min_delta": 100.0})]
    ctx = run_stages(host, stages)
    # epoch 1 sets the reference; nothing improves by 100, so it stops after 2 more
    assert len(ctx.history["loss"]) == 3


# --------------------------------------------------------------- restore best


def test_restore_best_loads_the_best_checkpoint(host, workdir):
    import keras

    # "best" is the *highest* val_loss, an early epoch, so the last weights are not it
    stages = [XOR_DATA, TINY_MLP,
              train_stage(epochs=6, batch_size=8, save_model=True, restore_best=True,
                          optimizer={"name": "adam", "learning_rate": 0.05},
                          checkpoint={"monitor": "val_loss", "mode": "max", "every_seconds": 0})]
    ctx = run_stages(host, stages)
    val = ctx.history["val_loss"]
    best = int(np.argmax(val))
    assert best < len(val) - 1 and val[best] > val[-1] + 1e-3
    now = ctx.model.evaluate(ctx.data.dataset("val", 64), verbose=0, return_dict=True)["loss"]
    assert now == pytest.approx(val[best], rel=1e-4)
    assert ctx.metrics["best_epoch"] == best + 1
    saved = keras.models.load_model(ctx.run_dir / "model" / "model.keras")
    x = ctx.data.x["val"]
    np.testing.assert_allclose(saved.predict(x, verbose=0), ctx.model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="restore_best needs checkpoint.enabled"):
        fit_params(restore_best=True, checkpoint={"enabled": False})


# ------------------------------------------------------------------------ XOR


def test_xor_one_layer_fails_two_layers_succeed(host, workdir, repo):
    doc = (repo / "pipelines" / "xor.yaml").read_text()
    base = ["tracking.enabled=false", "train.epochs=60", "train.verbose=0", "train.early_stopping=null",
            "evaluate.plots=false", "data.repeats=24"]
    results = {}
    for label, extra in (("one", ["model.hidden=[]"]), ("two", [])):
        loaded = load_yaml(doc, "xor.yaml")
        apply_overrides(loaded, [*base, *extra])
        ctx = run_pipeline(validate(loaded, host.registry), host)
        results[label] = ctx.metrics["test_accuracy"]
        assert ctx.model.count_params() == (6 if label == "one" else 22)
    assert 0.25 <= results["one"] <= 0.75
    assert results["two"] == 1.0


def test_xor_pipeline_logs_metrics_plots_and_a_reloadable_model(workdir, repo, capsys):
    import keras
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main(["run", str(repo / "pipelines" / "xor.yaml"), "--set", "train.epochs=3",
               "--set", "train.verbose=0"])
    assert rc == 0
    assert "restored the best weights" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-training")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss.label_smoothing"] == "0.05"
    assert run.data.params["train.optimizer.beta_2"] == "0.999"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 3
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0 and "best_epoch" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/learning_curves.png" in plots and any(p.endswith(".png") for p in plots - {"plots/learning_curves.png"})
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.models.load_model(local)
    assert type(model.loss).__name__ == "CategoricalLoss" and model.loss.label_smoothing == 0.05
    probs = model.predict(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype="float32"), verbose=0)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
