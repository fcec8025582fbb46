"""What the encoder-decoder architectures share: the model base classes, sequence
metrics, greedy and beam-search decoding, and attention heat-maps.

An :class:`EncoderDecoder` is called two ways:

* ``model({"encoder_inputs": src, "decoder_inputs": dec})`` (or a pair ``(src, dec)``):
  teacher forcing, the next-token probabilities ``(b, T, V)`` for every position of the
  given decoder inputs. This is what ``fit`` and ``evaluate`` use; the data bundle's
  ``dataset()`` builds ``dec`` from the targets.
* ``model(src)``: autoregressive greedy decoding inside the graph (``predict``); the
  probabilities ``(b, target_length, V)`` of the greedily chosen tokens.

:func:`greedy_decode` and :func:`beam_search` are plain functions on top of two
methods every such model has: ``encode(src)`` returns the encoder's memory and
``decode(memory, src, dec)`` returns ``(probabilities, attention)`` for decoder inputs
``dec``. Decoders are causal, so the output at position ``t`` depends only on
``dec[:, :t+1]``; decoding fills ``dec`` one position at a time.

Token ids follow :mod:`dlpipe.datasets.vocab`: 0 padding, 1 start, 2 end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from dlpipe.data import DataBundle
from dlpipe.datasets.vocab import END_ID, PAD_ID, START_ID
from dlpipe.errors import DlpipeError

if TYPE_CHECKING:
    from dlpipe.datasets.bundles import SeqBundle

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dlpipe")
class SequenceAccuracy(keras.metrics.Metric):
    """Share of sequences whose every target token (up to and including ``END``) is
    predicted; padding is ignored.

    Under teacher forcing this equals the exact-match accuracy of greedy decoding: if
    every next-token argmax is right given the true prefix, greedy decoding follows
    that same prefix, and vice versa.
    """

    def __init__(self, name: str = "sequence_accuracy", pad_id: int = PAD_ID, **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true = ops.cast(y_true, "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        ok = ops.logical_or(ops.equal(predicted, y_true), ops.equal(y_true, self.pad_id))
        rows = ops.cast(ops.all(ok, axis=-1), "float32")
        self.correct.assign_add(ops.sum(rows))
        self.count.assign_add(ops.cast(ops.shape(rows)[0], "float32"))

    def result(self) -> Any:
        return ops.divide_no_nan(self.correct, self.count)

    def reset_state(self) -> None:
        self.correct.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


@keras.saving.register_keras_serializable(package="dlpipe")
class TokenAccuracy(keras.metrics.Metric):
    """Share of target tokens (``END`` included, padding excluded) predicted right."""

    def __init__(self, name: str = "token_accuracy", pad_id: int = PAD_ID, **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true = ops.cast(y_true, "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        real = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        hits = ops.cast(ops.equal(predicted, y_true), "float32") * real
        self.correct.assign_add(ops.sum(hits))
        self.count.assign_add(ops.sum(real))

    def result(self) -> Any:
        return ops.divide_no_nan(self.correct, self.count)

    def reset_state(self) -> None:
        self.correct.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id}


def sequence_scores(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """``(sequence accuracy, token accuracy)`` of decoded ids against target ids.

    Both arrays are ``(n, T)`` with ``END`` then padding; positions after a target's
    ``END`` are ignored, and a prediction must stop where the target stops.
    """
    predicted, target = np.asarray(predicted), np.asarray(target)
    real = target != PAD_ID
    hits = (predicted == target) & real
    rows = np.all(hits | ~real, axis=1)
    n_tokens = int(real.sum())
    return (float(rows.mean()) if len(rows) else 0.0,
            float(hits.sum() / n_tokens) if n_tokens else 0.0)


# --------------------------------------------------------------------------------------
# The base classes
# --------------------------------------------------------------------------------------


class NextTokenModel(keras.Model):
    """A model that outputs next-token probabilities ``(b, T, V)``: the base of
    :class:`EncoderDecoder` and of :class:`~dlpipe.models.captioner.model.Captioner`.

    ``compile`` defaults the loss to ``sparse_categorical_crossentropy`` (the model
    outputs probabilities) and always adds the ``sequence_accuracy`` and
    ``token_accuracy`` metrics.
    """

    #: Keras sets it; declared because ``keras.Model`` is untyped and subclasses read it.
    built: bool

    def compile(self, optimizer: Any = "adam", loss: Any = None, metrics: Any = None,
                **kwargs: Any) -> None:
        if loss is None:
            loss = "sparse_categorical_crossentropy"
        metrics = list(metrics or [])
        names = {m if isinstance(m, str) else getattr(m, "name", None) for m in metrics}
        for metric in (SequenceAccuracy, TokenAccuracy):
            instance = metric()
            if instance.name not in names:
                metrics.append(instance)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras skips re-compiling on load when compile() is overridden; ours only adds
        # defaults, so compile from the saved config as Keras would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)


class EncoderDecoder(NextTokenModel):
    """Base class of :class:`~dlpipe.models.seq2seq.model.Seq2Seq` and
    :class:`~dlpipe.models.transformer.model.Transformer` (see the module docstring).

    Subclasses implement ``encode`` and ``decode``.
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        source_length: int,
        target_length: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_vocab_size = int(source_vocab_size)
        self.target_vocab_size = int(target_vocab_size)
        self.source_length = int(source_length)
        self.target_length = int(target_length)

    # -- to implement ----------------------------------------------------------------
    def encode(self, encoder_ids: Any, training: bool | None = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define encode()")

    def decode(
        self, memory: Any, encoder_ids: Any, decoder_ids: Any, training: bool | None = None
    ) -> tuple[Any, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define decode()")

    # -- Keras -----------------------------------------------------------------------
    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if isinstance(inputs, dict):
            encoder_ids, decoder_ids = inputs["encoder_inputs"], inputs["decoder_inputs"]
        elif isinstance(inputs, (list, tuple)) and len(inputs) == 2:
            encoder_ids, decoder_ids = inputs
        else:
            return greedy_probabilities(self, inputs)
        memory = self.encode(encoder_ids, training=training)
        probs, _ = self.decode(memory, encoder_ids, decoder_ids, training=training)
        return probs

    def build(self, input_shape: Any = None) -> None:
        """Create every variable with one teacher-forced pass on dummy ids (also used
        by ``load_model``)."""
        if self.built:
            return
        src = ops.ones((1, self.source_length), dtype="int32")
        dec = ops.ones((1, self.target_length), dtype="int32")
        memory = self.encode(src, training=False)
        self.decode(memory, src, dec, training=False)
        self.built = True

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "source_vocab_size": self.source_vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "source_length": self.source_length,
            "target_length": self.target_length,
        }


def check_sequence_data(name: str, data: DataBundle) -> None:
    """Raise :class:`DlpipeError` when ``data`` is not a tokenized sequence bundle."""
    if getattr(data, "source_vocab", None) is None or getattr(data, "target_vocab", None) is None:
        raise DlpipeError(
            f"{name}: needs a sequence bundle with source and target vocabularies (task "
            f"seq2seq, from a seq_* data stage), got {type(data).__name__} "
            f"'{getattr(data, 'name', '?')}' with task {getattr(data, 'task', '?')!r}"
        )



def sequence_sizes(name: str, data: Any) -> dict[str, int]:
    """The vocabulary sizes and lengths an encoder-decoder is built for, from a checked
    sequence bundle (:func:`check_sequence_data`)."""
    check_sequence_data(name, data)
    targets = data.y["train"]
    assert targets is not None  # a sequence bundle has targets in every split
    return {
        "source_vocab_size": data.source_vocab.size,
        "target_vocab_size": data.target_vocab.size,
        "source_length": int(data.x["train"].shape[1]),
        "target_length": int(targets.shape[1]),
    }

# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def greedy_probabilities(model: EncoderDecoder, encoder_ids: Any) -> Any:
    """In-graph greedy decoding: ``(b, target_length, V)`` probabilities of the tokens
    chosen greedily (``argmax`` gives the decoded ids)."""
    encoder_ids = ops.cast(encoder_ids, "int32")
    memory = model.encode(encoder_ids, training=False)
    return greedy_loop(
        lambda ids: model.decode(memory, encoder_ids, ids, training=False)[0],
        ops.shape(encoder_ids)[0],
        model.target_length,
    )


def greedy_loop(next_probabilities: Callable[[Any], Any], batch: Any, length: int) -> Any:
    """The in-graph greedy loop: decoder ids start as ``START`` then padding, and each
    pass writes the argmax at position ``t`` into position ``t + 1``.

    :param next_probabilities: ``(b, length)`` decoder ids -> ``(b, length, V)``.
    :returns: the probabilities of the last pass.
    """
    positions = ops.expand_dims(ops.arange(length, dtype="int32"), 0)
    decoder_ids = ops.where(
        ops.equal(positions, 0), START_ID, ops.zeros((batch, length), dtype="int32")
    )
    probs = None
    for t in range(length):
        probs = next_probabilities(decoder_ids)
        if t + 1 < length:
            token = ops.cast(ops.argmax(probs[:, t], axis=-1), "int32")
            decoder_ids = ops.where(
                ops.equal(positions, t + 1), ops.expand_dims(token, 1), decoder_ids
            )
    return probs


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def pad_after_end(ids: np.ndarray) -> np.ndarray:
    """A copy of ``ids (n, T)`` with every position after the first ``END`` set to 0."""
    ids = np.array(ids, copy=True)
    ended = np.cumsum(ids == END_ID, axis=1) > 0
    after = np.concatenate([np.zeros((len(ids), 1), bool), ended[:, :-1]], axis=1)
    ids[after] = PAD_ID
    return ids


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


def greedy_decode(
    model: Any, encoder_ids: np.ndarray, max_length: int | None = None, batch_size: int = 256,
    return_attention: bool = False,
) -> Any:
    """Autoregressive greedy decoding: at each step the most probable next token.

    :param model: an :class:`EncoderDecoder` (``encode``/``decode``/``target_length``).
    :param encoder_ids: ``(n, source_length)`` int ids.
    :returns: ``(n, max_length)`` int32 ids, padding after the first ``END``; with
        ``return_attention`` also the attention of the final pass (``None`` for a model
        without attention), ``(n, T, S)`` or ``(n, heads, T, S)``.
    """
    encoder_ids = np.asarray(encoder_ids, dtype=np.int32)
    length = int(max_length or model.target_length)
    out = np.zeros((len(encoder_ids), length), dtype=np.int32)
    attention: list[np.ndarray] = []
    for part in _batches(len(encoder_ids), batch_size):
        src = encoder_ids[part]
        memory = model.encode(src, training=False)
        dec = np.zeros((len(src), length), dtype=np.int32)
        dec[:, 0] = START_ID
        done = np.zeros(len(src), dtype=bool)
        attn = None
        for t in range(length):
            probs, attn = model.decode(memory, src, dec, training=False)
            token = _numpy(probs[:, t]).argmax(axis=-1).astype(np.int32)
            token[done] = PAD_ID
            out[part, t] = token
            done |= token == END_ID
            if t + 1 < length:
                dec[:, t + 1] = token
            if done.all():  # the last pass already saw every decoded position
                break
        if return_attention and attn is not None:
            attention.append(_numpy(attn))
    out = pad_after_end(out)
    if return_attention:
        return out, (np.concatenate(attention) if attention else None)
    return out


def beam_search(
    model: Any,
    encoder_ids: np.ndarray,
    beam_width: int = 3,
    max_length: int | None = None,
    length_penalty: float = 0.0,
    batch_size: int = 128,
) -> np.ndarray:
    """Beam-search decoding: keep the ``beam_width`` most probable prefixes per example.

    Each step extends every live beam by every token, scores the candidates by their
    summed log-probability and keeps the best ``beam_width``; a beam that emitted
    ``END`` is finished and only carries on with padding at no cost. The winner is the
    beam with the best score divided by ``length ** length_penalty`` (0: the raw
    log-probability). With ``beam_width=1`` this is exactly greedy decoding.

    :returns: ``(n, max_length)`` int32 ids, padding after the first ``END``.
    """
    if beam_width < 1:
        raise ValueError("beam_width must be at least 1")
    encoder_ids = np.asarray(encoder_ids, dtype=np.int32)
    length = int(max_length or model.target_length)
    k = beam_width
    out = np.zeros((len(encoder_ids), length), dtype=np.int32)
    for part in _batches(len(encoder_ids), batch_size):
        src = np.repeat(encoder_ids[part], k, axis=0)  # (b*k, S), beams of an example together
        b = len(encoder_ids[part])
        memory = model.encode(src, training=False)
        tokens = np.zeros((b, k, length), dtype=np.int32)
        scores = np.full((b, k), -np.inf)
        scores[:, 0] = 0.0  # one live beam to start with
        finished = np.zeros((b, k), dtype=bool)
        lengths = np.zeros((b, k), dtype=np.int32)
        for t in range(length):
            dec = np.zeros((b * k, length), dtype=np.int32)
            dec[:, 0] = START_ID
            dec[:, 1 : t + 1] = tokens.reshape(b * k, length)[:, :t]
            probs, _ = model.decode(memory, src, dec, training=False)
            logp = np.log(np.maximum(_numpy(probs[:, t]).astype(np.float64), 1e-30))
            vocab = logp.shape[-1]
            logp = logp.reshape(b, k, vocab)
            # Finished beams continue with padding only, keeping their score.
            logp[finished] = -np.inf
            logp[finished, PAD_ID] = 0.0
            candidates = (scores[:, :, None] + logp).reshape(b, k * vocab)
            best = np.argsort(-candidates, axis=1, kind="stable")[:, :k]
            beam, token = best // vocab, (best % vocab).astype(np.int32)
            rows = np.arange(b)[:, None]
            tokens = tokens[rows, beam]
            tokens[:, :, t] = token
            was_finished = finished[rows, beam]
            lengths = lengths[rows, beam] + (~was_finished).astype(np.int32)
            finished = was_finished | (token == END_ID)
            scores = candidates[rows, best]
            if finished.all():
                break
        ranked = scores / np.maximum(lengths, 1) ** length_penalty if length_penalty else scores
        winner = np.argmax(ranked, axis=1)
        out[part] = tokens[np.arange(b), winner]
    return pad_after_end(out)


# --------------------------------------------------------------------------------------
# Attention heat-maps
# --------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _heatmap(ax: Any, weights: np.ndarray, rows: list[str], cols: list[str], title: str) -> Any:
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6),
                      aspect="auto")
    ax.set_xticks(range(len(cols)), [repr(c)[1:-1] or " " for c in cols], fontsize=7, rotation=90)
    ax.set_yticks(range(len(rows)), [repr(r)[1:-1] for r in rows], fontsize=7)
    ax.set_xlabel("source", fontsize=8)
    ax.set_title(title, fontsize=8)
    return image


def attention_figure(
    weights: np.ndarray, source_tokens: list[str], output_tokens: list[str], title: str = ""
) -> Any:
    """A heat-map of ``weights (T_out, T_src)``, or one panel per head for
    ``(heads, T_out, T_src)`` (plus their mean), labelled with the tokens."""
    weights = np.asarray(weights, dtype=np.float32)
    panels = [weights] if weights.ndim == 2 else [weights.mean(axis=0), *weights]
    names = ["attention"] if weights.ndim == 2 else ["mean of heads"] + [
        f"head {h}" for h in range(weights.shape[0])
    ]
    rows, cols = len(output_tokens), len(source_tokens)
    width = max(2.5, 0.3 * cols + 1.2)
    fig = _figure(min(width * len(panels), 16.0), max(2.5, 0.3 * rows + 1.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel, name in zip(axes, panels, names, strict=True):
        image = _heatmap(ax, panel[:rows, :cols], output_tokens, source_tokens, name)
    axes[0].set_ylabel("output", fontsize=8)
    fig.colorbar(image, ax=list(axes), fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def attention_maps(model: Any, data: SeqBundle, split: str = "test", n: int = 4) -> list[Any]:
    """Attention heat-maps of the first ``n`` examples of ``split``, decoded greedily.

    One figure per example with the decoded output tokens as rows and the source
    tokens as columns; empty when the model has no attention.
    """
    if data.size(split) == 0:
        split = next((s for s in ("val", "train") if data.size(s) > 0), split)
    src = np.asarray(data.x[split][:n], dtype=np.int32)
    if not len(src):
        return []
    ids, attention = greedy_decode(model, src, return_attention=True)
    if attention is None:
        return []
    assert data.source_vocab is not None and data.target_vocab is not None  # set by build_bundle
    figures = []
    for i in range(len(src)):
        source_tokens = data.source_vocab.token_strings(src[i])
        output_tokens = data.target_vocab.token_strings(ids[i]) or ["</s>"]
        text = data.source_vocab.decode(src[i])
        result = data.target_vocab.decode(ids[i])
        weights = attention[i]
        weights = weights[..., : len(output_tokens), : len(source_tokens)]
        figures.append(attention_figure(weights, source_tokens, output_tokens,
                                        f"{text!r} -> {result!r}"))
    return figures


def plots(context: Any, model: Any, data: SeqBundle) -> Iterator[tuple[str, Any]]:
    """The registered plot hook: ``attention_<i>.png`` heat-maps for a few test examples."""
    for i, figure in enumerate(attention_maps(model, data)):
        yield f"attention_{i}.png", figure
