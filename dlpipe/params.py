"""Base class for plugin parameter schemas.

Every stage, model and strategy plugin declares its parameters as a subclass of
:class:`Params`. dlpipe validates a pipeline's ``params:`` mappings against these
classes before anything heavy is imported, and builds ``dlpipe schema`` from them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """A plugin's parameters. Unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class NoParams(Params):
    """For plugins that take no parameters."""
