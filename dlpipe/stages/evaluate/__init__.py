"""Built-in evaluation stage: test metrics and plots."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class KerasEvaluateParams(Params):
    split: Literal["test", "val", "train"] = "test"
    batch_size: int = Field(256, ge=1)
    plots: bool = Field(True, description="Learning curves, model plots, confusion matrix.")


@hookimpl
def register_stages(register):
    register("evaluate", "keras_evaluate", "dlpipe.stages.evaluate.stage:keras_evaluate",
             KerasEvaluateParams,
             "Metrics on the test split, learning curves and the model's own plots.")
