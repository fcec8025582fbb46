"""Sequence data, attention parts, seq2seq/transformer models and greedy/beam decoding."""

from __future__ import annotations

import datetime as dt
import json
import typing
from types import SimpleNamespace

import numpy as np
import pytest

from dlpipe.datasets import sequences as sd
from dlpipe.datasets.bundles import SeqBundle, load_vocabularies, tokenize
from dlpipe.datasets.vocab import (
    END_ID,
    PAD_ID,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    char_vocabulary,
    encode_texts,
    learn_bpe,
)
from dlpipe.testing import build_architecture as build

# --------------------------------------------------------------------------- helpers


def tiny_bundle(n=240, alphabet="abcd", min_length=2, max_length=5, reverse=True, seed=0):
    pairs = sd.reverse_pairs(n, alphabet, min_length, max_length, reverse=reverse, seed=seed)
    return tokenize("tiny", sd.split_pairs(pairs, 0.1, 0.1, seed))


# --------------------------------------------------------------------------- data


def test_generation_is_deterministic_given_a_seed():
    for make in (
        lambda s: sd.addition_pairs(300, 3, seed=s),
        lambda s: sd.date_pairs(300, seed=s),
        lambda s: sd.reverse_pairs(300, seed=s),
        lambda s: sd.sort_pairs(300, seed=s),
    ):
        assert make(5) == make(5)
        assert make(5) != make(6)
    a = tokenize("d", sd.split_pairs(sd.date_pairs(300, seed=1), 0.1, 0.1, 1))
    b = tokenize("d", sd.split_pairs(sd.date_pairs(300, seed=1), 0.1, 0.1, 1))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.x[split], b.x[split])
        np.testing.assert_array_equal(a.y[split], b.y[split])
    # splits are disjoint: sources are distinct
    seen = [s for split in ("train", "val", "test") for s in a.texts[split][0]]
    assert len(seen) == len(set(seen)) == 300


def test_tasks_are_correct_and_dates_parse_back():
    sources, targets = sd.date_pairs(2000, seed=3)
    for source, target in zip(sources, targets, strict=True):
        assert sd.parse_date(source) == dt.date.fromisoformat(target), source
    # every format appears, in mixed case, and the date is formatted as documented
    day = dt.date(2026, 11, 23)
    assert sd.format_date(day, "d_month_y") == "23 November 2026"
    assert sd.format_date(day, "mon_d_y") == "nov 23, 2026"
    assert sd.format_date(day, "y/m/d") == "2026/11/23"
    assert sd.format_date(day, "weekday_d_month_y") == "Monday, 23 November 2026"
    for fmt in sd.DATE_FORMATS:
        assert sd.parse_date(sd.format_date(day, fmt)) == day
        assert sd.parse_date(sd.format_date(day, fmt).upper()) == day
    assert any(s.isupper() for s in sources) and any(s.islower() for s in sources)

    for source, target in zip(*sd.addition_pairs(500, 3, seed=0), strict=True):
        a, b = source.split("+")
        assert int(a) + int(b) == int(target) and len(a) <= 3 and len(b) <= 3
    for source, target in zip(*sd.reverse_pairs(200, seed=0), strict=True):
        assert target == source[::-1]
    for source, target in zip(*sd.sort_pairs(200, seed=0), strict=True):
        assert target == "".join(sorted(source))


def test_plugin_date_formats_match_the_generator():
    from dlpipe.stages.sequences import DateFormat, DatesParams

    assert set(typing.get_args(DateFormat)) == set(sd.DATE_FORMATS)
    assert DatesParams().formats == list(sd.DATE_FORMATS)


def test_vocabularies_round_trip():
    texts = ["23 November 2026", "nov 23, 2026", "12 November 1999"] * 5
    char = char_vocabulary(texts)
    assert char.tokens[:4] == list(SPECIALS)
    for text in texts:
        assert char.decode(char.encode(text)) == text
    assert char.encode("Z") == [UNK_ID]

    bpe = learn_bpe(texts, vocab_size=40)
    assert bpe.level == "subword" and len(bpe.merges) > 0 and bpe.size <= 40
    for text in texts:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert len(ids) < len(text)  # subwords compress
    assert max(len(t) for t in bpe.split("23 November 2026")) >= 3
    again = Vocabulary.from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again.encode("nov 23, 2026") == bpe.encode("nov 23, 2026")


def test_bundle_layout_and_teacher_forcing_dataset():
    data = tiny_bundle()
    assert data.task == "seq2seq" and data.x["train"].dtype == np.int32
    src, tgt = data.texts["train"][0][0], data.texts["train"][1][0]
    row = data.y["train"][0]
    assert data.target_vocab.decode(row) == tgt and data.source_vocab.decode(data.x["train"][0]) == src
    assert row[len(tgt)] == END_ID and np.all(row[len(tgt) + 1 :] == PAD_ID)

    inputs, y, weights = next(iter(data.dataset("train", 8)))
    y = y.numpy()
    dec = inputs["decoder_inputs"].numpy()
    np.testing.assert_array_equal(inputs["encoder_inputs"].numpy(), data.x["train"][:8])
    assert np.all(dec[:, 0] == START_ID)
    np.testing.assert_array_equal(dec[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(weights.numpy(), (y != PAD_ID).astype("float32"))


def test_tokenizer_stage_retokenizes_and_logs_the_vocabulary(tmp_path):
    logged = []
    data = tokenize("dates", sd.split_pairs(sd.date_pairs(400, seed=0), 0.1, 0.1, 0))
    ctx = SimpleNamespace(data=data, extras={}, run_dir=tmp_path, stage=SimpleNamespace(id="tok"),
                          log_artifact=lambda path, folder="": logged.append((str(path), folder)))
    from dlpipe.stages.sequences import TokenizerParams
    from dlpipe.stages.sequences.stage import tokenizer

    tokenizer(ctx, TokenizerParams(level="subword", vocab_size=120))
    bundle = ctx.data
    assert bundle is not data and bundle.source_vocab.level == "subword"
    assert bundle.source_length < data.source_length
    assert bundle.target_length < data.target_length
    for split in ("train", "test"):
        for i, text in enumerate(bundle.texts[split][0][:20]):
            assert bundle.source_vocab.decode(bundle.x[split][i]) == text
    assert logged == [(str(tmp_path / "vocab" / "vocab.json"), "vocab")]
    source, target = load_vocabularies(tmp_path / "vocab" / "vocab.json")
    assert source.tokens == bundle.source_vocab.tokens and target.level == "subword"


# --------------------------------------------------------------------------- attention parts


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_scaled_dot_product_attention_matches_numpy():
    from dlpipe.models.attention import scaled_dot_product_attention

    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, 5, 8)).astype("float32")
    k = rng.normal(size=(2, 3, 7, 8)).astype("float32")
    v = rng.normal(size=(2, 3, 7, 4)).astype("float32")
    mask = rng.random((2, 1, 5, 7)) > 0.3
    mask[..., 0] = True  # every query keeps a key

    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
    weights = _softmax(scores)
    out, w = scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(w), weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), weights @ v, rtol=1e-5, atol=1e-5)

    masked = _softmax(np.where(mask, scores, -np.inf))
    out, w = scaled_dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(w), masked, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), masked @ v, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] == 0.0)


def test_causal_mask_gives_future_positions_zero_weight():
    from dlpipe.models.attention import (
        MultiHeadAttention,
        causal_mask,
        scaled_dot_product_attention,
    )

    mask = np.asarray(causal_mask(6))
    np.testing.assert_array_equal(mask, np.tril(np.ones((6, 6), bool)))
    x = np.random.default_rng(1).normal(size=(2, 6, 8)).astype("float32")
    _, w = scaled_dot_product_attention(x, x, x, mask=mask)
    w = np.asarray(w)
    assert np.all(w[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)

    layer = MultiHeadAttention(num_heads=2, d_model=8)
    out, heads = layer(x, x, mask=causal_mask(6))
    heads = np.asarray(heads)
    assert heads.shape == (2, 2, 6, 6)
    assert np.all(heads * ~np.tril(np.ones((6, 6), bool)) == 0.0)
    # changing the last position does not change earlier outputs
    y = x.copy()
    y[:, -1] += 5.0
    out2, _ = layer(y, y, mask=causal_mask(6))
    np.testing.assert_allclose(np.asarray(out)[:, :-1], np.asarray(out2)[:, :-1], atol=1e-5)


def test_sinusoidal_positional_encoding_values():
    from dlpipe.models.attention import PositionalEmbedding, sinusoidal_encoding

    d = 16
    pe = sinusoidal_encoding(50, d)
    assert pe.shape == (50, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-6)
    np.testing.assert_array_equal(pe[0, 0::2], 0.0)
    np.testing.assert_array_equal(pe[0, 1::2], 1.0)

    layer = PositionalEmbedding(vocab_size=5, length=10, d_model=d)
    ids = np.array([[1, 2, 3]])
    out = np.asarray(layer(ids))
    tokens = np.asarray(layer.token_embedding(ids)) * np.sqrt(d)
    np.testing.assert_allclose(out - tokens, pe[None, :3], atol=1e-5)
    learned = PositionalEmbedding(vocab_size=5, length=10, d_model=d, kind="learned")
    assert np.asarray(learned(ids)).shape == (1, 3, d) and len(learned.trainable_weights) == 2


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["seq2seq", "transformer"])
def test_architecture_conforms_on_sequence_data(host, name):
    from dlpipe.testing import check_architecture

    data = sd.example_bundle()
    model = check_architecture(host.registry.models[name], data=data)
    out = model.predict(data.x["test"], verbose=0)
    assert out.shape == (data.size("test"), data.target_length, data.target_vocab.size)


def test_transformer_decoder_is_causal_and_beam_width_one_is_greedy(host):
    from dlpipe.models.decoding import beam_search, greedy_decode

    data = tiny_bundle(n=120)
    model = build(host, "transformer", data, positional="learned")
    src = data.x["test"]
    dec = data.decoder_inputs(data.y["test"])
    memory = model.encode(src)
    probs, cross = model.decode(memory, src, dec)
    changed = dec.copy()
    changed[:, 3:] = (changed[:, 3:] + 1) % data.target_vocab.size
    probs2, _ = model.decode(memory, src, changed)
    np.testing.assert_allclose(np.asarray(probs)[:, :3], np.asarray(probs2)[:, :3], atol=1e-5)
    assert not np.allclose(np.asarray(probs)[:, 3:], np.asarray(probs2)[:, 3:])
    cross = np.asarray(cross)
    assert cross.shape == (len(src), 2, data.target_length, data.source_length)
    assert np.all(cross[np.broadcast_to((src == 0)[:, None, None, :], cross.shape)] == 0.0)

    greedy = greedy_decode(model, src, batch_size=32)
    np.testing.assert_array_equal(beam_search(model, src, beam_width=1, batch_size=32), greedy)


@pytest.fixture(scope="module")
def copy_model(builtin_host):
    """A small seq2seq (GRU + dot attention) trained to copy strings."""
    import keras

    data = tiny_bundle(n=2000, alphabet="abcde", min_length=2, max_length=6, reverse=False)
    model = build(builtin_host, "seq2seq", data, cell="gru", attention="dot",
                  embedding_dim=16, units=64)
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0))
    model.fit(data.dataset("train", 32, shuffle=True), epochs=6, verbose=0, shuffle=False)
    return model, data


def test_greedy_decoding_of_a_copy_model_returns_the_copy(copy_model):
    from dlpipe.models.decoding import greedy_decode, pad_after_end, sequence_scores

    model, data = copy_model
    src = data.x["test"]
    ids = greedy_decode(model, src)
    outputs = [data.target_vocab.decode(row) for row in ids]
    copies = [data.source_vocab.decode(row) for row in src]
    accuracy = np.mean([o == c for o, c in zip(outputs, copies, strict=True)])
    assert accuracy >= 0.9, list(zip(copies, outputs, strict=True))[:10]
    assert sequence_scores(ids, data.y["test"])[0] == pytest.approx(accuracy)
    # the in-graph greedy decoding of model.predict(src) agrees
    in_graph = np.asarray(model.predict(src, verbose=0)).argmax(-1)
    np.testing.assert_array_equal(pad_after_end(in_graph), ids)
    # teacher-forced sequence accuracy equals the exact match of greedy decoding
    results = model.evaluate(data.dataset("test", 64), return_dict=True, verbose=0)
    assert results["sequence_accuracy"] == pytest.approx(accuracy)


def test_beam_search_width_one_equals_greedy(copy_model):
    from dlpipe.models.decoding import beam_search, greedy_decode, sequence_scores

    model, data = copy_model
    src = data.x["test"]
    greedy = greedy_decode(model, src, batch_size=64)
    np.testing.assert_array_equal(beam_search(model, src, beam_width=1, batch_size=64), greedy)
    wide = beam_search(model, src, beam_width=3)
    assert wide.shape == greedy.shape
    assert sequence_scores(wide, data.y["test"])[0] >= sequence_scores(greedy, data.y["test"])[0] - 0.05


def test_attention_maps_are_drawn(copy_model):
    from dlpipe.models.seq2seq.model import plots

    model, data = copy_model
    figures = list(plots(None, model, data))
    assert [name for name, _ in figures] == [f"attention_{i}.png" for i in range(4)]
    image = figures[0][1].axes[0].images[0].get_array()
    source_len = len(data.source_vocab.token_strings(data.x["test"][0]))
    assert image.shape[1] == source_len
    np.testing.assert_allclose(np.asarray(image).sum(axis=1), 1.0, atol=1e-4)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_addition_pipeline_end_to_end(workdir, repo, capsys):
    import keras
    from mlflow.tracking import MlflowClient

    from dlpipe.cli import main
    from dlpipe.paths import default_tracking_uri

    rc = main([
        "run", str(repo / "pipelines" / "addition.yaml"),
        "--set", "train.epochs=2", "--set", "data.n=400", "--set", "model.units=16",
        "--set", "evaluate.beam_width=2", "--set", "train.early_stopping=null",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test_sequence_accuracy" in out

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("dlpipe-sequence")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("test_sequence_accuracy", "test_token_accuracy", "test_beam_sequence_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["test_loss"] > 0.0
    for key in ("val_sequence_accuracy", "token_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    names = {a.path for folder in ("vocab", "model", "plots", "report")
             for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"vocab/vocab.json", "model/model.keras", "report/examples.md",
            "plots/attention_0.png", "plots/accuracy_by_length.png"} <= names

    vocab_file = client.download_artifacts(run.info.run_id, "vocab/vocab.json", str(workdir))
    source_vocab, target_vocab = load_vocabularies(vocab_file)
    assert set("0123456789+") <= set(source_vocab.tokens)
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(workdir))
    model = keras.saving.load_model(local)
    src = np.zeros((3, model.source_length), dtype="int32")
    for i, text in enumerate(["12+34", "5+5", "999+1"]):
        ids = source_vocab.encode(text)
        src[i, : len(ids)] = ids
    probs = model.predict(src, verbose=0)
    assert probs.shape == (3, model.target_length, target_vocab.size)
    # the compile config came back too: teacher-forced evaluation reports our metrics
    y = encode_texts(["46", "10", "1000"], target_vocab, model.target_length, end=True)
    inputs = {"encoder_inputs": src, "decoder_inputs": SeqBundle.decoder_inputs(y)}
    results = model.evaluate(inputs, y, return_dict=True, verbose=0)
    assert {"loss", "sequence_accuracy", "token_accuracy"} <= set(results)
