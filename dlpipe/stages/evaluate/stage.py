"""The evaluation stage: metrics on a held-out split, and the plots people look at."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe.plotting import confusion_matrix_figure, learning_curves_figure
from dlpipe.stages.reports.common import (
    compiled_metrics,
    evaluation_inputs,
    print_metrics,
    split_predictions,
)


def keras_evaluate(ctx: Any, params: Any) -> None:
    split = params.split
    model, data, _ = evaluation_inputs(ctx, split)
    metrics = compiled_metrics(model, data, split, params.batch_size)
    ctx.log_metrics(metrics)
    print_metrics(f"evaluate ({split}, {data.size(split)} examples)", metrics)

    if not params.plots:
        return
    if ctx.history:
        ctx.log_figure(learning_curves_figure(ctx.history), "learning_curves.png")
    entry = ctx.model_entry()
    task = entry.task if entry else data.task
    if task == "classification" and data.y.get(split) is not None:
        labels, outputs = split_predictions(model, data, split, params.batch_size)
        predicted = np.argmax(outputs, axis=-1)
        fig = confusion_matrix_figure(labels, predicted, data.class_names)
        ctx.log_figure(fig, "confusion_matrix.png")
    plotter = entry.plotter() if entry else None
    if plotter is not None:
        for filename, figure in plotter(ctx, model, data):
            ctx.log_figure(figure, filename)
