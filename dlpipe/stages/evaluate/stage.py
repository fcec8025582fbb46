"""The evaluation stage: metrics on a held-out split, and the plots people look at."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.plotting import confusion_matrix_figure, learning_curves_figure


def evaluation_inputs(
    ctx: Any, split: str, what: str = "evaluation", targets: str | None = None
) -> tuple[Any, Any, str]:
    """``(model, data, stage id)`` for an evaluate stage, or a clear error.

    Checks that a data stage and a model came before, that ``split`` has examples,
    and, when ``targets`` names them ("labels", "masks", ...), that it has targets.
    """
    stage = ctx.stage.id if ctx.stage is not None else what
    model, data = ctx.model, ctx.data
    if model is None or data is None:
        raise DlpipeError(
            f"stage {stage!r}: {what} needs a data stage and a trained model before it"
        )
    if data.size(split) == 0:
        raise DlpipeError(
            f"stage {stage!r}: the {split!r} split is empty; set a non-zero "
            f"{'test' if split == 'test' else 'val'}_fraction in the data stage or evaluate "
            "another split (params.split)"
        )
    if targets is not None and data.y.get(split) is None:
        raise DlpipeError(f"stage {stage!r}: the {split!r} split has no {targets} to compare with")
    return model, data, stage


def keras_evaluate(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, _ = evaluation_inputs(ctx, split)
    results = model.evaluate(data.dataset(split, params.batch_size), return_dict=True, verbose=0)
    metrics = {f"{split}_{k}": float(v) for k, v in results.items() if np.ndim(v) == 0}
    ctx.log_metrics(metrics)
    width = max(len(k) for k in metrics) if metrics else 0
    print(f"evaluate ({split}, {data.size(split)} examples):")
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}")

    if not params.plots:
        return
    if ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    entry = ctx.model_entry()
    task = entry.task if entry else data.task
    if task == "classification" and data.y.get(split) is not None:
        probs = model.predict(data.dataset(split, params.batch_size), verbose=0)
        predicted = np.argmax(probs, axis=-1)
        fig = confusion_matrix_figure(data.y[split], predicted, data.class_names)
        ctx.log_figure(fig, "confusion_matrix.png")
    plotter = entry.plotter() if entry else None
    if plotter is not None:
        for filename, figure in plotter(ctx, model, data):
            ctx.log_figure(figure, filename)
