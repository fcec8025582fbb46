"""The model stage: build the named architecture inside the strategy's scope."""

from __future__ import annotations

import inspect
from typing import Any

from dlpipe.errors import DlpipeError


def wants_context(build: Any) -> bool:
    """Whether ``build`` takes a third ``context`` argument (see ``register_models``)."""
    try:
        sig = inspect.signature(build)
    except (TypeError, ValueError):
        return False
    if "context" in sig.parameters:
        return True
    positional = [
        p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def build_model(ctx: Any, params: Any) -> None:
    if ctx.data is None:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: the model stage needs a data stage before it "
            "(models are shaped by their data)"
        )
    entry = ctx.plugins.registry.models[ctx.stage.use]
    build = entry.builder()
    with ctx.strategy.scope():
        model = build(params, ctx.data, ctx) if wants_context(build) else build(params, ctx.data)
    ctx.model = model
    ctx.models[ctx.stage.id] = model
    n_params = model.count_params() if model.built else 0
    print(f"model: {entry.name} ({entry.plugin}), {n_params:,} parameters")
