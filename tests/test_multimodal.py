"""CLIP-style dual encoder, BLIP-style captioner and the captions data: the contrastive
loss and evaluation maths on hand-made numbers, deterministic captions, decoding
shapes, save/reload, and one short run of each pipeline through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlpipe.datasets import captions as cap  # noqa: E402
from dlpipe.datasets.vocab import END_ID, PAD_ID  # noqa: E402
from dlpipe.models.captioner import CaptionerParams  # noqa: E402
from dlpipe.models.captioner import model as captioner  # noqa: E402
from dlpipe.models.clip import CLIPParams  # noqa: E402
from dlpipe.models.clip import model as clip  # noqa: E402
from dlpipe.stages.reports.clip import (  # noqa: E402
    class_embeddings,
    recall_at_k,
    relevance,
    zero_shot_predict,
)

TINY = {"filters": [4], "num_heads": 2, "ff_dim": 16, "dropout": 0.0}


def as_np(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def loss_sum(logits, targets=None):
    i2t, t2i = clip.contrastive_loss(np.asarray(logits, "float32"), targets)
    return float(as_np(i2t)), float(as_np(t2i))


# --------------------------------------------------------------------------------------
# The contrastive loss
# --------------------------------------------------------------------------------------


def test_perfect_similarity_minimizes_the_symmetric_infonce_loss():
    n = 5
    perfect = 50.0 * np.eye(n)
    i2t, t2i = loss_sum(perfect)
    assert i2t == pytest.approx(0.0, abs=1e-6) and t2i == pytest.approx(0.0, abs=1e-6)
    # uniform similarities: each row is a uniform guess among n captions -> log n
    i2t, t2i = loss_sum(np.full((n, n), 3.0))
    assert i2t == pytest.approx(math.log(n), rel=1e-6) and t2i == pytest.approx(math.log(n), rel=1e-6)
    # any mismatched assignment of the same scores is worse than the right one
    moderate = 2.0 * np.eye(n) + 0.1 * np.random.default_rng(0).random((n, n))
    best = sum(loss_sum(moderate))
    for perm in itertools.islice(itertools.permutations(range(n)), 1, 30):
        assert sum(loss_sum(moderate[:, list(perm)])) > best


def test_loss_directions_differ_for_an_asymmetric_matrix():
    logits = np.array([[5.0, 0.0], [5.0, 0.0]])  # both images pick caption 0
    i2t, t2i = loss_sum(logits)
    assert i2t == pytest.approx(0.5 * (math.log1p(math.exp(-5)) + math.log1p(math.exp(5))), rel=1e-5)
    assert t2i == pytest.approx(0.5 * (math.log(2) + math.log(2)), rel=1e-5)


def test_label_positives_spread_the_target_over_same_class_pairs():
    labels = np.array([0, 1, 0, -1])
    targets = as_np(clip.match_targets("label", labels=labels))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets, targets.T)
    assert targets[0, 2] == pytest.approx(0.5) and targets[1, 1] == 1.0
    assert targets[3, 3] == 1.0 and targets[3].sum() == 1.0  # unknown label: itself only
    # with duplicates, scoring both same-class captions equally is the minimum: log 2 per row
    logits = 50.0 * (targets > 0)
    i2t, _ = loss_sum(logits, targets)
    assert i2t == pytest.approx(0.5 * math.log(2), rel=1e-4)  # rows 0 and 2 (of 4) pay log 2
    caption_ids = np.array([[4, 5, 2], [4, 5, 2], [4, 6, 2]])
    same = as_np(clip.match_targets("caption", captions=caption_ids))
    assert same[0, 1] == pytest.approx(0.5) and same[2, 2] == 1.0
    np.testing.assert_allclose(as_np(clip.match_targets("pair", labels=labels)), np.eye(4))


# --------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# --------------------------------------------------------------------------------------


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zero_shot_accuracy_is_one_when_images_equal_their_class_prompt_embeddings():
    rng = np.random.default_rng(0)
    prompts = unit(rng.normal(size=(4, 3, 16)))  # 4 classes x 3 templates
    classes = class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-5)
    labels = rng.integers(0, 4, 40)
    images = classes[labels]
    assert float(np.mean(zero_shot_predict(images, classes) == labels)) == 1.0
    # swapping two class embeddings swaps the predictions
    swapped = classes[[1, 0, 2, 3]]
    predicted = zero_shot_predict(images, swapped)
    assert np.all(predicted[labels == 0] == 1) and np.all(predicted[labels == 1] == 0)


def test_recall_at_k_on_a_hand_made_similarity_matrix():
    sim = np.array([
        [0.9, 0.1, 0.0, 0.2],   # own caption first
        [0.8, 0.1, 0.7, 0.3],   # own caption (1) ranked last of 4
        [0.1, 0.2, 0.5, 0.6],   # own caption second
        [0.0, 0.1, 0.2, 0.3],   # own caption first
    ])  # fmt: skip
    pairs = np.eye(4, dtype=bool)
    assert recall_at_k(sim, pairs, [1, 2, 3, 4]) == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
    # text -> image is the transposed problem: only caption 0 finds its image first
    # (caption 1's best image is 2, caption 2's is 1, caption 3's is 2)
    assert recall_at_k(sim.T, pairs, [1, 2]) == {1: 0.25, 2: 0.5}
    # labels [0, 1, 0, 1]: image 1 ranks captions 0, 2 (class 0) before 3 (class 1): rank 3;
    # image 2 ranks caption 3 (class 1) before 2: rank 2
    rel = relevance("label", np.array([0, 1, 0, 1]), ["a", "b", "c", "d"])
    assert recall_at_k(sim, rel, [1, 2, 3]) == {1: 0.5, 2: 0.75, 3: 1.0}
    rel = relevance("caption", None, ["x", "y", "x", "z"])
    assert rel[0, 2] and rel[2, 0] and not rel[0, 1]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def test_digit_captions_are_deterministic_from_the_seed_and_tokenized_by_word():
    a = cap.digits_bundle(limit=120, seed=3)
    b = cap.digits_bundle(limit=120, seed=3)
    c = cap.digits_bundle(limit=120, seed=4)
    assert a.texts == b.texts
    assert all(np.array_equal(a.captions[s], b.captions[s]) for s in ("train", "val", "test"))
    assert a.texts["train"] != c.texts["train"]
    vocab = a.vocab
    assert vocab.level == "word" and "handwritten" in vocab.tokens
    for text, ids, label in zip(a.texts["train"], a.captions["train"], a.y["train"], strict=True):
        assert vocab.decode(ids) == text
        assert ids[len(text.split())] == END_ID and np.all(ids[len(text.split()) + 1 :] == PAD_ID)
        fields = a.class_fields[label]
        assert text in [t.format(**fields) for t in cap.DIGIT_TEMPLATES]
    batch = next(iter(a.dataset("train", 8)))
    x, y, w = batch
    assert set(x) == {"images", "captions", "decoder_inputs", "labels"}
    np.testing.assert_array_equal(as_np(x["decoder_inputs"])[:, 1:], as_np(y)[:, :-1])
    np.testing.assert_array_equal(as_np(w), (as_np(y) != PAD_ID).astype("float32"))


def test_shape_captions_name_every_object_left_to_right():
    from dlpipe.datasets.shapes import COLORS, SHAPES

    bundle = cap.shapes_bundle(30, size=16, objects=(1, 2), seed=1)
    again = cap.shapes_bundle(30, size=16, objects=(1, 2), seed=1)
    assert bundle.texts == again.texts
    texts = [t for s in ("train", "val", "test") for t in bundle.texts[s]]
    assert any(" and " in t for t in texts)
    for text in texts:
        for part in text.split(" and "):
            article, color, shape = part.split()
            assert article == "a" and color in COLORS and shape in SHAPES
    assert bundle.num_classes == 12 and len(bundle.class_fields) == 12


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data():
    return cap.example_bundle(48, seed=0)


def test_clip_embeddings_are_normalized_and_reload_unchanged(tiny_data, tmp_path):
    keras.utils.set_random_seed(0)
    params = CLIPParams(**TINY, embed_dim=8, width=8, text_layers=1, temperature=0.2)
    model = clip.build(params, tiny_data)
    images = tiny_data.x["test"][:5]
    ids = tiny_data.captions["test"][:5]
    img, txt = as_np(model.encode_images(images)), as_np(model.encode_texts(ids))
    assert img.shape == (5, 8) and txt.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    assert float(as_np(model.logit_scale())) == pytest.approx(5.0, rel=1e-5)  # 1 / 0.2
    assert not model.log_scale.trainable
    assert set(model.loss_weights) == {"image_to_text", "text_to_image"}
    path = tmp_path / "clip.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(as_np(loaded.encode_images(images)), img, atol=1e-5)
    np.testing.assert_allclose(as_np(loaded.encode_texts(ids)), txt, atol=1e-5)
    learnable = clip.build(CLIPParams(**TINY, embed_dim=8, width=8, text_layers=1), tiny_data)
    assert learnable.log_scale.trainable
    assert float(as_np(learnable.logit_scale())) == pytest.approx(1 / 0.07, rel=1e-4)


def test_captioner_greedy_and_beam_decoding_shapes_and_reload(tiny_data, tmp_path):
    keras.utils.set_random_seed(0)
    model = captioner.build(CaptionerParams(**TINY, d_model=8, decoder_layers=1), tiny_data)
    images = tiny_data.x["test"][:3]
    length, vocab = tiny_data.caption_length, tiny_data.vocab.size
    greedy = model.caption(images)
    assert greedy.shape == (3, length) and greedy.dtype == np.int32
    assert greedy.min() >= 0 and greedy.max() < vocab
    beam = model.caption(images, beam_width=2)
    assert beam.shape == (3, length)
    probs = as_np(model(images))  # in-graph greedy decoding (predict)
    assert probs.shape == (3, length, vocab)
    ids = probs.argmax(-1)
    from dlpipe.models.decoding import pad_after_end

    np.testing.assert_array_equal(pad_after_end(ids), greedy)  # the two greedy paths agree
    teacher = as_np(model(tiny_data.features("test")))
    assert teacher.shape == (len(tiny_data.x["test"]), length, vocab)
    path = tmp_path / "captioner.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.caption(images), greedy)


# --------------------------------------------------------------------------------------
# Pipelines through the CLI
# --------------------------------------------------------------------------------------


def _single_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_clip_and_captioning_pipelines_log_metrics_artifacts_and_reloadable_models(
    workdir, repo, capsys
):
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    small = ["--set", "model.filters=[8]", "--set", "model.num_heads=2",
             "--set", "model.ff_dim=16"]
    rc = main(["run", str(repo / "pipelines" / "clip.yaml"), "--set", "train.epochs=2",
               "--set", "data.limit=300", "--set", "model.embed_dim=16",
               "--set", "model.width=16", "--set", "model.text_layers=1",
               "--set", "train.loss_weights.text_to_image=0.5", *small])
    assert rc == 0
    assert "test_zero_shot_accuracy" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri())
    run = _single_run(client, "dlpipe-multimodal")
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "image_to_text_loss")] == [0, 1]
    assert [m.step for m in client.get_metric_history(rid, "temperature")] == [0, 1]
    for key in ("test_zero_shot_accuracy", "test_i2t_recall_at_1", "test_t2i_recall_at_10",
                "test_loss"):
        assert 0.0 <= run.data.metrics[key] < math.inf
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {"plots/similarity_matrix.png", "plots/zero_shot_confusion_matrix.png"} <= plots
    local = client.download_artifacts(rid, "vocab/vocab.json", str(workdir))
    with open(local, encoding="utf-8") as handle:
        vocab = json.load(handle)
    assert vocab["captions"]["level"] == "word" and "handwritten" in vocab["captions"]["tokens"]
    model = keras.saving.load_model(
        client.download_artifacts(rid, "model/model.keras", str(workdir)))
    assert isinstance(model, clip.CLIP)
    assert float(as_np(model.loss_weights["text_to_image"])) == 0.5
    assert as_np(model.encode_images(np.zeros((2, 16, 16, 1), "float32"))).shape == (2, 16)
    client.delete_run(rid)

    rc = main(["run", str(repo / "pipelines" / "captioning.yaml"), "--set", "train.epochs=1",
               "--set", "data.n=200", "--set", "model.d_model=16",
               "--set", "model.decoder_layers=1", "--set", "evaluate.beam_width=2", *small])
    assert rc == 0
    assert "test_caption_exact_match" in capsys.readouterr().out
    exp = client.get_experiment_by_name("dlpipe-multimodal")
    (run,) = client.search_runs([exp.experiment_id])
    rid = run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "token_accuracy")] == [0]
    for key in ("test_caption_exact_match", "test_caption_token_accuracy",
                "test_beam_caption_exact_match"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert "plots/captions.png" in {a.path for a in client.list_artifacts(rid, "plots")}
    model = keras.saving.load_model(
        client.download_artifacts(rid, "model/model.keras", str(workdir)))
    assert isinstance(model, captioner.Captioner)
    assert model.caption(np.zeros((2, 32, 32, 3), "float32")).shape == (2, model.caption_length)
