"""Base class for plugin parameter schemas.

Every stage, model and strategy plugin declares its parameters as a subclass of
:class:`Params`. dlpipe validates a pipeline's ``params:`` mappings against these
classes before anything heavy is imported, and builds ``dlpipe schema`` from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """A plugin's parameters. Unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def spec_references(self) -> Mapping[str, Sequence[Any]]:
        """Dotted paths (``--set`` syntax) into *earlier* stages that these params
        name, each with sample values they may write there.

        Validation checks that every path exists and that the stage it points into
        accepts every value; problems are reported at the key that names the path.
        The tune stage returns its search space here. Default: none.
        """
        return {}

    def loss_weight_paths(self) -> Mapping[str, tuple[str, ...]]:
        """Names of the model's own loss terms that these params set, each with the key
        path, inside these params, of the key that sets it: a train stage's
        ``loss_weights: {kl: 0.5}`` is ``{"kl": ("loss_weights", "kl")}``.

        Validation checks every name against the terms that the architecture of the
        model stage before this stage registers (``register_models(..., loss_weights=)``),
        for the spec's own values and for each value a search space may write (then only
        the names set under the path it writes). Default: none.
        """
        return {}


class NoParams(Params):
    """For plugins that take no parameters."""
