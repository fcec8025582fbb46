"""Vision Transformer, transformer text classifier, the seq_arith_check data stage and
the per-length buckets of seq2seq_report."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dlpipe.datasets import sequences as sd
from dlpipe.datasets.vocab import PAD_ID, Vocabulary, encode_texts
from dlpipe.errors import DlpipeError
from dlpipe.stages.reports.seq2seq import accuracy_by_bucket, bucket_metrics, length_buckets
from dlpipe.testing import build_architecture as build

# --------------------------------------------------------------------------- ViT


@pytest.mark.parametrize(
    ("shape", "patch", "tokens"),
    [((16, 16, 1), 4, 1 + 16), ((32, 32, 3), 8, 1 + 16), ((8, 12, 1), 2, 1 + 24)],
)
def test_vit_patch_count_sequence_length_and_shapes(host, shape, patch, tokens):
    from dlpipe.models.vit import model as vit
    from dlpipe.testing import synthetic_bundle

    assert vit.sequence_length(shape, patch) == tokens
    data = synthetic_bundle("classification", n=4, shape=shape, num_classes=5)
    model = build(host, "vit", data, patch_size=patch, d_model=16, num_heads=2, depth=2)
    rows, cols = shape[0] // patch, shape[1] // patch
    assert tuple(model.get_layer("patch_embedding").output.shape) == (None, rows, cols, 16)
    assert model.get_layer("patch_embedding").kernel.shape == (patch, patch, shape[2], 16)
    assert tuple(model.get_layer("positions").table.shape) == (tokens, 16)
    assert tuple(model.get_layer("cls_token").cls.shape) == (1, 1, 16)
    hidden, weights = model.get_layer("block_1").output
    assert tuple(hidden.shape) == (None, tokens, 16)
    assert tuple(weights.shape) == (None, 2, tokens, tokens)
    probs = np.asarray(model.predict(data.x["test"], verbose=0))
    assert probs.shape == (4, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    att = vit.cls_attention(model, data.x["test"][:3])
    assert att.shape == (3, rows, cols)
    assert np.all(att >= 0) and np.all(att.sum(axis=(1, 2)) <= 1.0 + 1e-5)


def test_vit_rejects_images_that_do_not_tile(host):
    from dlpipe.testing import synthetic_bundle

    data = synthetic_bundle("classification", n=4, shape=(10, 10, 1))
    with pytest.raises(DlpipeError, match="does not split into 4x4 patches"):
        build(host, "vit", data, patch_size=4)


# --------------------------------------------------------------------------- text classifier


def _padded(data, extra):
    """``data``'s test ids with ``extra`` more padding columns."""
    x = data.x["test"]
    return np.concatenate([x, np.zeros((len(x), extra), dtype=x.dtype)], axis=1)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_classifier_respects_the_padding_mask(host, pooling):
    data = sd.arith_example_bundle(n=80, seed=1)
    x = data.x["test"]
    assert np.any(x == PAD_ID), "the test needs padded rows"
    model = build(host, "transformer_classifier", data, dropout=0.0, pooling=pooling)
    base = np.asarray(model(x, training=False))

    # 1) what the padded positions hold does not matter: give PAD a random embedding
    table = model.embedding.token_embedding.embeddings
    weights = np.asarray(table).copy()
    weights[PAD_ID] = np.random.default_rng(0).normal(0.0, 5.0, weights.shape[1])
    table.assign(weights)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), base, atol=1e-5)

    # 2) neither does how many there are (the same texts padded further)
    bigger = build(host, "transformer_classifier", _bigger_length(data, 4), dropout=0.0,
                   pooling=pooling)
    bigger.set_weights(_transfer(model, bigger))
    np.testing.assert_allclose(np.asarray(bigger(_padded(data, 4), training=False)),
                               np.asarray(model(x, training=False)), atol=1e-5)

    # 3) while a real token does matter
    changed = x.copy()
    changed[:, 0] = np.where(changed[:, 0] == 5, 6, 5)
    assert not np.allclose(np.asarray(model(changed, training=False)), base, atol=1e-5)


def _bigger_length(data, extra):
    """A copy of ``data`` whose sequences are ``extra`` tokens longer (more padding)."""
    import copy

    out = copy.copy(data)
    out.x = {s: np.concatenate([v, np.zeros((len(v), extra), v.dtype)], axis=1)
             for s, v in data.x.items()}
    return out


def _transfer(small, big):
    """``small``'s weights for ``big``: identical shapes except the positional table
    (learned) which ``big`` has longer; sinusoidal tables have no weights."""
    out = []
    for w_small, w_big in zip(small.get_weights(), big.get_weights(), strict=True):
        if w_small.shape == w_big.shape:
            out.append(w_small)
        else:
            grown = w_big.copy()
            grown[: len(w_small)] = w_small
            out.append(grown)
    return out


def test_text_classifier_learned_positions_and_attention_maps(host):
    data = sd.arith_example_bundle(n=80, seed=2)
    model = build(host, "transformer_classifier", data, positional="learned", num_layers=2)
    x = data.x["test"][:3]
    maps = model.attention_maps(x)
    assert len(maps) == 2
    length = 1 + x.shape[1]  # [cls] + tokens
    assert maps[0].shape == (3, 2, length, length)
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, rtol=1e-5)
    real = np.concatenate([np.ones((3, 1), bool), x != PAD_ID], axis=1)
    # no query gives weight to a padded key
    assert np.all(maps[-1] * ~real[:, None, None, :] == 0.0)


def test_text_classifier_rejects_images(host):
    from dlpipe.testing import synthetic_bundle

    with pytest.raises(DlpipeError, match="needs token ids"):
        build(host, "transformer_classifier", synthetic_bundle("classification"))


# --------------------------------------------------------------------------- seq_arith_check

EQUATION = re.compile(r"^(\d+)([-+*])(\d+)=(-?\d+)$")


def _truth(text):
    a, op, b, c = EQUATION.match(text).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return value, int(c)


def test_arith_check_labels_are_correct_and_balanced():
    texts, labels = sd.arith_check_examples(2000, digits=2, off_by=3, seed=3)
    assert len(set(texts)) == 2000
    assert sum(labels) == 1000  # exactly balanced
    swaps = offs = 0
    for text, label in zip(texts, labels, strict=True):
        right, written = _truth(text)
        assert (right == written) == bool(label), text
        assert sd.check_equation(text) == bool(label)
        a, _, b, _ = EQUATION.match(text).groups()
        assert len(a) <= 2 and len(b) <= 2
        if not label:
            assert written >= 0  # no negative giveaways for '+'
            if 1 <= abs(written - right) <= 3:
                offs += 1
            else:  # two adjacent digits of the right result swapped
                swaps += 1
                assert sorted(str(written)) == sorted(str(right)), text
    assert offs > 0 and swaps > 0  # both kinds of mistakes occur

    texts, labels = sd.arith_check_examples(600, digits=2, operators="+-*", seed=4)
    assert {EQUATION.match(t).group(2) for t in texts} == {"+", "-", "*"}
    for text, label in zip(texts, labels, strict=True):
        right, written = _truth(text)
        assert (right == written) == bool(label), text
    assert sd.arith_check_examples(300, seed=5) == sd.arith_check_examples(300, seed=5)


def test_arith_check_stage_splits_tokenizes_and_logs_the_vocabulary(tmp_path):
    from types import SimpleNamespace

    from dlpipe.stages.sequences import ArithCheckParams
    from dlpipe.stages.sequences.stage import arith_check

    logged = []
    ctx = SimpleNamespace(data=None, extras={}, run_dir=tmp_path, seed=0,
                          stage=SimpleNamespace(id="data"),
                          log_artifact=lambda path, folder="": logged.append((str(path), folder)))
    arith_check(ctx, ArithCheckParams(n=1000, val_fraction=0.1, test_fraction=0.2))
    data = ctx.data
    assert data.task == "classification" and data.num_classes == 2
    assert data.class_names == ["wrong", "correct"]
    assert [data.size(s) for s in ("train", "val", "test")] == [700, 100, 200]
    for split in ("train", "val", "test"):
        y = data.y[split]
        assert y.dtype == np.int32 and abs(y.mean() - 0.5) < 0.01  # stratified
        assert data.x[split].dtype == np.int32
        for row, text, label in zip(data.x[split][:50], data.texts[split][:50], y[:50],
                                    strict=False):
            assert data.vocab.decode(row) == text
            assert sd.check_equation(text) == bool(label)
    seen = [t for s in ("train", "val", "test") for t in data.texts[s]]
    assert len(set(seen)) == 1000  # no equation in two splits
    assert logged == [(str(tmp_path / "vocab" / "vocab.json"), "vocab")]
    import json

    doc = json.loads((tmp_path / "vocab" / "vocab.json").read_text())
    assert doc["classes"] == ["wrong", "correct"] and "=" in doc["source"]["tokens"]


# --------------------------------------------------------------------------- per-length buckets


def test_length_buckets_and_bucket_accuracy_on_a_hand_made_example():
    lengths = np.array([10, 11, 14, 15, 19, 20, 27, 27])
    correct = np.array([1, 0, 1, 1, 1, 0, 1, 0], dtype=bool)
    buckets = length_buckets(lengths, width=5)
    assert buckets == [(10, 14), (15, 19), (20, 24), (25, 29)]
    table = accuracy_by_bucket(lengths, correct, buckets)
    assert table == {(10, 14): (pytest.approx(2 / 3), 3), (15, 19): (1.0, 2),
                     (20, 24): (0.0, 1), (25, 29): (0.5, 2)}
    assert bucket_metrics(table, "test") == {
        "test_seq_acc_len_10_14": pytest.approx(2 / 3), "test_seq_acc_len_15_19": 1.0,
        "test_seq_acc_len_20_24": 0.0, "test_seq_acc_len_25_29": 0.5,
    }
    # explicit lower bounds; an empty bucket is left out
    assert length_buckets(lengths, edges=[12, 16, 21, 22]) == [
        (10, 11), (12, 15), (16, 20), (22, 27)]
    assert length_buckets(np.array([3, 4]), width=10) == [(0, 9)]
    assert length_buckets(np.array([], dtype=int)) == []


def test_filler_words_lengthen_dates_without_changing_targets():
    from dlpipe.stages.sequences import DatesParams

    assert DatesParams().filler_words == 0  # the default data is unchanged
    pairs = sd.date_pairs(400, seed=0)
    sources, targets = sd.add_filler_words(pairs, 6, seed=0)
    assert targets == pairs[1]
    longer = 0
    for plain, source, target in zip(pairs[0], sources, targets, strict=True):
        assert source.startswith(plain)
        extra = source[len(plain):]
        assert not any(ch.isdigit() for ch in extra)
        if extra:
            longer += 1
            assert len(extra.removeprefix(", ").split()) <= 6
        assert sd.parse_date(plain).isoformat() == target
    assert 0.7 < longer / len(sources) < 0.95  # 0 words 1 time in 7
    assert max(map(len, sources)) > max(map(len, pairs[0])) + 20


# --------------------------------------------------------------------------- pipelines


def _run(repo, name, *sets):
    from dlpipe.cli import main

    args = ["run", str(repo / "pipelines" / f"{name}.yaml")]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0


def _finished_run(experiment):
    from mlflow.tracking import MlflowClient

    from dlpipe.paths import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


def _reloaded(client, run, workdir):
    import keras

    from dlpipe.stages.train.fit import WarmUp

    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    # The warm-up schedule in the saved optimizer is not registered with Keras
    # (dlpipe.stages.train.fit.WarmUp), so it is passed here to reload the compiled model.
    return keras.saving.load_model(local, custom_objects={"WarmUp": WarmUp})


@pytest.mark.slow
def test_arith_pipeline_logs_accuracy_plots_vocab_and_a_loadable_model(workdir, repo):
    _run(repo, "arith_classifier", "data.n=600", "train.epochs=2", "model.d_model=16",
         "model.num_heads=2", "model.ff_dim=32", "model.num_layers=1")
    client, run = _finished_run("dlpipe-sequence")
    rid = run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "accuracy")] == [0, 1]
    assert [m.step for m in client.get_metric_history(rid, "val_accuracy")] == [0, 1]
    for key in ("test_accuracy", "test_roc_auc", "test_f1_macro"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {"plots/cls_attention.png", "plots/confusion_matrix.png",
            "plots/roc_curve.png"} <= plots
    assert {a.path for a in client.list_artifacts(rid, "vocab")} == {"vocab/vocab.json"}

    # the saved model is the evaluated one: rebuild the test split and score it again
    import json

    vocab_file = client.download_artifacts(rid, "vocab/vocab.json", str(workdir))
    with open(vocab_file, encoding="utf-8") as f:
        vocab = Vocabulary.from_dict(json.load(f)["source"])
    texts, labels = sd.arith_check_examples(600, seed=42)
    test_texts, test_labels = sd.split_labelled(texts, labels, 0.1, 0.1, 42)["test"]
    model = _reloaded(client, run, workdir)
    ids = encode_texts(test_texts, vocab, int(model.max_length), end=False)
    probs = np.asarray(model.predict(ids, verbose=0))
    assert probs.shape == (len(test_texts), 2)
    accuracy = float(np.mean(probs.argmax(axis=1) == np.asarray(test_labels)))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_vit_pipeline_logs_accuracy_attention_and_a_loadable_model(workdir, repo):
    _run(repo, "vit_digits", "data.limit=300", "train.epochs=2", "model.d_model=16",
         "model.num_heads=2", "model.mlp_dim=32", "model.depth=1")
    client, run = _finished_run("dlpipe-vit-vs-cnn")
    rid = run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "val_accuracy")] == [0, 1]
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {"plots/cls_attention.png", "plots/confusion_matrix.png",
            "plots/misclassified.png"} <= plots

    from dlpipe.models.vit.model import ViTBlock

    model = _reloaded(client, run, workdir)
    assert any(isinstance(layer, ViTBlock) for layer in model.layers)
    images = np.random.default_rng(0).random((4, 16, 16, 1)).astype("float32")
    probs = np.asarray(model.predict(images, verbose=0))
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
