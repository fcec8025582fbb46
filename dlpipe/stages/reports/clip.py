"""The ``clip_report`` evaluation stage for dual encoders (the ``clip`` architecture).

On a held-out split of caption data it logs

* ``<split>_zero_shot_accuracy``: each image classified by the class whose *prompt*
  embedding is most similar, with no classifier trained. A class's prompt embedding
  is the normalized mean of the text embeddings of every prompt template filled with
  the class's words (``"a photo of the number {digit}"``; the placeholders are the
  data's class fields). Also ``<split>_zero_shot_accuracy_prompt_<i>`` per template
  and ``zero_shot_chance`` (1 / classes);
* ``<split>_i2t_recall_at_<k>`` and ``<split>_t2i_recall_at_<k>``: retrieval among the
  split's pairs. Image -> text ranks all captions by similarity to an image; a hit is a
  relevant caption among the top ``k``. ``match`` decides what is relevant: ``label``
  (a caption of an image of the same class), ``caption`` (the same text) or ``pair``
  (only the image's own caption);
* ``<split>_loss``: the contrastive loss of ``model.evaluate``;

and the artifacts ``plots/similarity_matrix.png`` (images vs captions),
``plots/zero_shot_confusion_matrix.png`` and ``plots/learning_curves.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe.datasets.captions import CaptionBundle, encode_captions, prompt_texts
from dlpipe.datasets.vocab import UNK_ID
from dlpipe.errors import DlpipeError
from dlpipe.plotting import confusion_matrix_figure, learning_curves_figure
from dlpipe.stages.reports.common import compiled_metrics, evaluation_inputs, print_metrics


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries (rows) with a relevant item among their ``k`` most similar.

    :param similarity: ``(queries, items)`` scores, higher is more similar.
    :param relevant: ``(queries, items)`` booleans. Ties are broken by item order.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {int(k): float(np.mean(first < k)) if len(first) else 0.0 for k in ks}


def relevance(match: str, labels: np.ndarray | None, texts: Sequence[str]) -> np.ndarray:
    """``(n, n)`` booleans: which captions count as right for which image."""
    n = len(texts)
    if match == "label" and labels is not None:
        labels = np.asarray(labels)
        return (labels[:, None] == labels[None, :]) | np.eye(n, dtype=bool)
    if match == "caption":
        array = np.asarray(texts, dtype=object)
        return array[:, None] == array[None, :]
    return np.eye(n, dtype=bool)


def zero_shot_predict(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """The class of each image: the most similar class embedding (cosine)."""
    return np.argmax(np.asarray(image_emb) @ np.asarray(class_emb).T, axis=1)


def class_embeddings(prompt_emb: np.ndarray) -> np.ndarray:
    """``(classes, templates, d)`` prompt embeddings -> ``(classes, d)``: the mean over
    templates, normalized again (prompt ensembling, as in the CLIP paper)."""
    mean = np.asarray(prompt_emb, dtype=np.float64).mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def encode_prompts(model: Any, data: CaptionBundle, templates: Sequence[str]) -> np.ndarray:
    """``(classes, templates, d)`` text embeddings of the filled prompt templates."""
    from dlpipe.models.clip.model import embed

    assert data.vocab is not None
    table = prompt_texts(templates, data.class_fields)
    flat = [text for row in table for text in row]
    length = int(getattr(model, "caption_length", data.caption_length))
    longest = max(len(data.vocab.encode(t)) + 1 for t in flat)
    if longest > length:
        raise DlpipeError(f"clip_report: a prompt has {longest - 1} tokens; the model reads at "
                          f"most {length - 1} (shorten the prompts)")
    ids = encode_captions(flat, data.vocab, length)
    unknown = sorted({tok for t in flat for tok in data.vocab.split(t)
                      if data.vocab.encode(tok) == [UNK_ID]})
    if unknown:
        print(f"clip_report: prompt tokens not in the vocabulary (read as <unk>): {unknown}")
    emb = embed(model.encode_texts, ids)
    return emb.reshape(len(table), len(templates), -1)


def clip_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, _ = evaluation_inputs(
        ctx, split, "clip_report", bundle=CaptionBundle,
        before="the 'captions' data stage and a trained dual encoder (clip)",
        methods=("encode_images", "encode_texts"), use="the clip architecture",
    )
    from dlpipe.models.clip.model import embed
    from dlpipe.models.clip.plots import similarity_plot

    images = np.asarray(data.x[split], dtype=np.float32)
    labels = data.y.get(split)
    image_emb = embed(model.encode_images, images, params.batch_size)
    text_emb = embed(model.encode_texts, np.asarray(data.captions[split]), params.batch_size)
    metrics: dict[str, float] = {}

    compiled = compiled_metrics(model, data, split, params.batch_size)
    if f"{split}_loss" in compiled:
        metrics[f"{split}_loss"] = compiled[f"{split}_loss"]

    # zero-shot classification
    templates = list(params.prompts or data.templates)
    if labels is not None and data.class_fields and templates:
        prompt_emb = encode_prompts(model, data, templates)
        predicted = zero_shot_predict(image_emb, class_embeddings(prompt_emb))
        metrics[f"{split}_zero_shot_accuracy"] = float(np.mean(predicted == labels))
        if len(templates) > 1:
            for i in range(len(templates)):
                alone = zero_shot_predict(image_emb, class_embeddings(prompt_emb[:, i : i + 1]))
                metrics[f"{split}_zero_shot_accuracy_prompt_{i}"] = float(np.mean(alone == labels))
        metrics["zero_shot_chance"] = 1.0 / max(len(data.class_fields), 1)
        if params.confusion_matrix:
            ctx.log_figure(confusion_matrix_figure(labels, predicted, data.class_names),
                           "zero_shot_confusion_matrix.png")

    # retrieval
    similarity = image_emb @ text_emb.T
    relevant = relevance(params.match, labels, data.texts[split])
    for k, value in recall_at_k(similarity, relevant, params.ks).items():
        metrics[f"{split}_i2t_recall_at_{k}"] = value
    for k, value in recall_at_k(similarity.T, relevant.T, params.ks).items():
        metrics[f"{split}_t2i_recall_at_{k}"] = value

    ctx.log_metrics(metrics)
    print_metrics(f"clip_report ({split}, {len(images)} pairs, {len(templates)} prompt "
                  f"template(s), match {params.match})", metrics)
    if params.matrix_size:
        ctx.log_figure(similarity_plot(model, data, split, params.matrix_size),
                       "similarity_matrix.png")
    if params.learning_curves and ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
