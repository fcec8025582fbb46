"""The ``xor`` data stage (generator: :mod:`dlpipe.datasets.xor`)."""

from __future__ import annotations

from typing import Any

from dlpipe.datasets.xor import xor_points
from dlpipe.stages.data.finish import finish


def xor(ctx: Any, params: Any) -> None:
    """The XOR problem in the ``layout`` of the params (see :func:`xor_points`)."""
    seed = params.seed if params.seed is not None else ctx.seed
    x, y = xor_points(params.layout, params.repeats, params.noise, seed)
    finish(ctx, params, "xor", x, y, "classification", ["0", "1"])
