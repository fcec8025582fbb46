"""The ``seq2seq_report`` evaluation stage for encoder-decoder models.

Decodes a split greedily (autoregressively, never teacher-forced) and logs

* ``<split>_sequence_accuracy``: share of outputs whose text equals the target;
* ``<split>_token_accuracy``: share of target tokens (with the end token) decoded at
  their position;
* ``<split>_loss``: the teacher-forced loss of ``model.evaluate``;
* with ``beam_width > 0`` also ``<split>_beam_sequence_accuracy``;
* ``<split>_seq_acc_len_<lo>_<hi>``: sequence accuracy of the examples whose source has
  ``lo`` to ``hi`` tokens (both included), one metric per non-empty length bucket
  (``length_bucket_width`` wide, or the edges given in ``length_buckets``). Comparing
  these between runs shows where a model breaks down: an RNN encoder-decoder without
  attention loses long inputs first (``pipelines/dates.yaml`` vs
  ``pipelines/dates_no_attention.yaml``);

and the artifacts ``report/examples.md`` (a table of sources, targets and outputs),
``plots/accuracy_by_length.png`` (sequence accuracy per source length, with the bucket
accuracies drawn over the bars), ``plots/learning_curves.png`` and the model's attention
heat-maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.datasets.bundles import SeqBundle
from dlpipe.datasets.vocab import PAD_ID
from dlpipe.models.decoding import beam_search, greedy_decode, sequence_scores
from dlpipe.plotting import learning_curves_figure
from dlpipe.stages.reports.common import compiled_metrics, evaluation_inputs, print_metrics


def _markdown_cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "(empty)"


def examples_table(sources: list[str], targets: list[str], outputs: list[str]) -> str:
    """A markdown table: source, target, output and whether they match."""
    lines = ["| # | source | target | output | ok |", "|---|---|---|---|---|"]
    for i, (s, t, o) in enumerate(zip(sources, targets, outputs, strict=True)):
        lines.append(f"| {i} | {_markdown_cell(s)} | {_markdown_cell(t)} | "
                     f"{_markdown_cell(o)} | {'yes' if o == t else 'no'} |")
    return "\n".join(lines) + "\n"


def accuracy_by_length(lengths: np.ndarray, correct: np.ndarray) -> dict[int, tuple[float, int]]:
    """Sequence accuracy and count for each source length."""
    return {
        int(n): (float(correct[lengths == n].mean()), int((lengths == n).sum()))
        for n in np.unique(lengths)
    }


def length_buckets(
    lengths: np.ndarray, width: int = 5, edges: list[int] | None = None
) -> list[tuple[int, int]]:
    """Inclusive ``(lo, hi)`` source-length ranges covering ``lengths``.

    With ``edges`` (ascending lower bounds, e.g. ``[0, 12, 20]``) the buckets are
    ``[0, 11]``, ``[12, 19]`` and ``[20, longest]``; otherwise they are ``width`` long and
    aligned to multiples of it (``[10, 14]``, ``[15, 19]``, ...), so runs on the same
    data get the same buckets. Buckets without examples are left out.
    """
    lengths = np.asarray(lengths, dtype=int)
    if lengths.size == 0:
        return []
    longest = int(lengths.max())
    if edges:
        lows = sorted({int(e) for e in edges})
        bounds = [(lo, nxt - 1) for lo, nxt in zip(lows, lows[1:], strict=False)]
        bounds.append((lows[-1], max(longest, lows[-1])))
        if int(lengths.min()) < lows[0]:
            bounds.insert(0, (int(lengths.min()), lows[0] - 1))
    else:
        width = max(int(width), 1)
        first = int(lengths.min()) // width * width
        bounds = [(lo, lo + width - 1) for lo in range(first, longest + 1, width)]
    return [(lo, hi) for lo, hi in bounds if np.any((lengths >= lo) & (lengths <= hi))]


def accuracy_by_bucket(
    lengths: np.ndarray, correct: np.ndarray, buckets: list[tuple[int, int]]
) -> dict[tuple[int, int], tuple[float, int]]:
    """Sequence accuracy and count of the examples in each inclusive length bucket."""
    lengths = np.asarray(lengths)
    correct = np.asarray(correct, dtype=float)
    out: dict[tuple[int, int], tuple[float, int]] = {}
    for lo, hi in buckets:
        inside = (lengths >= lo) & (lengths <= hi)
        if inside.any():
            out[(lo, hi)] = (float(correct[inside].mean()), int(inside.sum()))
    return out


def bucket_metrics(
    table: dict[tuple[int, int], tuple[float, int]], split: str
) -> dict[str, float]:
    """``{"<split>_seq_acc_len_<lo>_<hi>": accuracy}`` for every bucket."""
    return {f"{split}_seq_acc_len_{lo}_{hi}": acc for (lo, hi), (acc, _) in table.items()}


def _length_figure(
    table: dict[int, tuple[float, int]],
    title: str,
    buckets: dict[tuple[int, int], tuple[float, int]] | None = None,
) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    lengths = sorted(table)
    ax.bar(lengths, [table[n][0] for n in lengths], color="tab:blue", alpha=0.6,
           label="per length")
    for n in lengths:
        ax.annotate(str(table[n][1]), (n, table[n][0]), ha="center", va="bottom", fontsize=6)
    for i, ((lo, hi), (acc, count)) in enumerate(sorted((buckets or {}).items())):
        ax.hlines(acc, lo - 0.45, hi + 0.45, color="tab:red", lw=2,
                  # matplotlib's stub says str, but set_label takes None (no label)
                  label="per bucket" if i == 0 else None)  # type: ignore[arg-type]
        ax.annotate(f"{acc:.2f} (n={count})", ((lo + hi) / 2, acc), xytext=(0, -10),
                    textcoords="offset points", ha="center", fontsize=6, color="tab:red")
    if buckets:
        ax.legend(loc="lower left", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("source length (tokens); bar labels: examples")
    ax.set_ylabel("sequence accuracy")
    ax.set_title(title, fontsize=9)
    return fig


def seq2seq_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, _ = evaluation_inputs(
        ctx, split, "seq2seq_report", bundle=SeqBundle,
        before="a sequence data stage (seq_addition, seq_dates, ...) and a trained seq2seq "
        "or transformer model",
    )
    assert data.source_vocab is not None and data.target_vocab is not None
    x = np.asarray(data.x[split], dtype=np.int32)
    y = np.asarray(data.y[split], dtype=np.int32)
    sources, targets = data.texts[split]

    predicted = greedy_decode(model, x, batch_size=params.batch_size)
    outputs = [data.target_vocab.decode(row) for row in predicted]
    correct = np.array([o == t for o, t in zip(outputs, targets, strict=True)])
    _, token_accuracy = sequence_scores(predicted, y)
    metrics = {
        f"{split}_sequence_accuracy": float(correct.mean()),
        f"{split}_token_accuracy": token_accuracy,
    }
    compiled = compiled_metrics(model, data, split, params.batch_size)
    if f"{split}_loss" in compiled:
        metrics[f"{split}_loss"] = compiled[f"{split}_loss"]
    if params.beam_width > 0:
        beams = beam_search(model, x, beam_width=params.beam_width)
        beam_outputs = [data.target_vocab.decode(row) for row in beams]
        metrics[f"{split}_beam_sequence_accuracy"] = float(
            np.mean([o == t for o, t in zip(beam_outputs, targets, strict=True)])
        )
    lengths = (x != PAD_ID).sum(axis=1)
    buckets = accuracy_by_bucket(
        lengths, correct,
        length_buckets(lengths, params.length_bucket_width, params.length_buckets),
    )
    metrics.update(bucket_metrics(buckets, split))
    ctx.log_metrics(metrics)
    print_metrics(f"seq2seq_report ({split}, {len(x)} examples, greedy decoding)", metrics)

    n = min(params.examples, len(x))
    if n:
        wrong = [i for i in range(len(x)) if not correct[i]]
        rows = list(range(n - min(len(wrong), n // 2))) + wrong[: n // 2]
        rows = sorted(set(rows))[:n]
        table = examples_table([sources[i] for i in rows], [targets[i] for i in rows],
                               [outputs[i] for i in rows])
        path = Path(ctx.run_dir) / "report" / "examples.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# {data.name}: greedy decoding of the {split} split\n\n"
                  + "".join(f"- {k}: {v:.4f}\n" for k, v in metrics.items())
                  + "\nFirst examples, then some mistakes.\n\n")
        path.write_text(header + table, encoding="utf-8")
        ctx.log_artifact(path, "report")
        print(table if n <= 10 else "\n".join(table.splitlines()[: 12]) + "\n  ...")

    by_length = accuracy_by_length(lengths, correct)
    ctx.log_figure(_length_figure(by_length, f"{data.name}: {split} accuracy by source length",
                                  buckets),
                   "accuracy_by_length.png")
    if params.learning_curves and ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    if params.attention_maps:
        entry = ctx.model_entry()
        plotter = entry.plotter() if entry else None
        if plotter is not None:
            for filename, figure in plotter(ctx, model, data):
                ctx.log_figure(figure, filename)
