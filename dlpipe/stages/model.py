"""The model stage: build the named architecture inside the strategy's scope."""

from __future__ import annotations

from typing import Any

from dlpipe.errors import DlpipeError


def build_model(ctx: Any, params: Any) -> None:
    if ctx.data is None:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: the model stage needs a data stage before it "
            "(models are shaped by their data)"
        )
    entry = ctx.plugins.registry.models[ctx.stage.use]
    with ctx.strategy.scope():
        model = entry.builder()(params, ctx.data)
    ctx.model = model
    n_params = model.count_params() if model.built else 0
    print(f"model: {entry.name} ({entry.plugin}), {n_params:,} parameters")
