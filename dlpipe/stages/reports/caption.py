"""The ``caption_report`` evaluation stage for image captioners (``captioner``).

Captions a held-out split autoregressively (greedy decoding, never teacher-forced) and
logs

* ``<split>_caption_exact_match``: share of generated captions equal to the true one;
* ``<split>_caption_token_accuracy``: share of true tokens (``END`` included) generated
  at their position;
* with ``beam_width > 1`` also ``<split>_beam_caption_exact_match``;
* ``<split>_loss``: the teacher-forced cross-entropy of ``model.evaluate``;

and the artifacts ``plots/captions.png`` (images with generated and true captions),
``report/captions.md`` (a table of them) and ``plots/learning_curves.png``.

Exact match is only attainable when the caption is a function of the image: shapes
captions are (``"a red circle"``); digits captions draw one of several templates at
random, so there the ceiling is about one over the number of templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.datasets.captions import CaptionBundle
from dlpipe.models.decoding import sequence_scores
from dlpipe.plotting import learning_curves_figure
from dlpipe.stages.reports.common import compiled_metrics, evaluation_inputs, print_metrics


def captions_table(generated: list[str], truth: list[str]) -> str:
    lines = ["| # | generated | true | ok |", "|---|---|---|---|"]
    for i, (g, t) in enumerate(zip(generated, truth, strict=True)):
        lines.append(f"| {i} | {g or '(empty)'} | {t} | {'yes' if g == t else 'no'} |")
    return "\n".join(lines) + "\n"


def caption_report(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, _ = evaluation_inputs(
        ctx, split, "caption_report", bundle=CaptionBundle,
        before="the 'captions' data stage and a trained captioner",
        methods=("caption",), use="the captioner architecture",
    )
    from dlpipe.models.captioner.plots import caption_grid

    assert data.vocab is not None
    images = np.asarray(data.x[split], dtype=np.float32)
    truth_ids = np.asarray(data.captions[split])
    ids = model.caption(images, batch_size=params.batch_size)
    exact, tokens = sequence_scores(ids, truth_ids)
    metrics = {f"{split}_caption_exact_match": exact, f"{split}_caption_token_accuracy": tokens}
    if params.beam_width > 1:
        beam = model.caption(images, beam_width=params.beam_width, batch_size=params.batch_size)
        metrics[f"{split}_beam_caption_exact_match"] = sequence_scores(beam, truth_ids)[0]
    compiled = compiled_metrics(model, data, split, params.batch_size)
    if f"{split}_loss" in compiled:
        metrics[f"{split}_loss"] = compiled[f"{split}_loss"]
    ctx.log_metrics(metrics)
    print_metrics(f"caption_report ({split}, {len(images)} images)", metrics)

    generated = [data.vocab.decode(row) for row in ids]
    truth = list(data.texts[split])
    for g, t in list(zip(generated, truth, strict=True))[:3]:
        print(f"  {t!r} -> {g!r}")
    if params.examples:
        n = min(params.examples, len(images))
        ctx.log_figure(caption_grid(images[:n], generated[:n], truth[:n], data.value_range),
                       "captions.png")
        out = Path(ctx.run_dir) / "report" / "captions.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(captions_table(generated[: max(n, 50)], truth[: max(n, 50)]),
                       encoding="utf-8")
        ctx.log_artifact(out, "report")
    if params.learning_curves and ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
