"""Pipeline specs: loading YAML with positions, overrides, and validation.

A spec is validated in full before anything heavy starts: its structure, that every
``use:`` names a registered plugin, and every plugin's ``params`` against that
plugin's schema, and that every stage's needs are provided by a stage before it. All
problems are reported together, each with file, line, key path, what was expected,
what was found and close matches.

The modules, by job:

- :mod:`~dlpipe.spec.document`: safe, bounded YAML loading that keeps positions;
- :mod:`~dlpipe.spec.paths`: dotted paths and ``--set`` overrides;
- :mod:`~dlpipe.spec.settings`: the spec's own keys and the validated spec;
- :mod:`~dlpipe.spec.problems`: pydantic's errors as located problems;
- :mod:`~dlpipe.spec.validation`: :func:`validate`, stage by stage;
- :mod:`~dlpipe.spec.checks`: the checks across stages.

Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

from dlpipe.errors import SpecError
from dlpipe.spec.document import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_DIGITS,
    MAX_VALUES,
    YamlDocument,
    load_yaml,
    read_spec_file,
)
from dlpipe.spec.paths import (
    apply_overrides,
    flatten,
    flatten_params,
    parse_override,
    resolve_path,
    set_path,
    stage_ids,
)
from dlpipe.spec.problems import MAX_PROBLEMS, pydantic_problems
from dlpipe.spec.settings import (
    TOP_LEVEL_KEYS,
    ResolvedSpec,
    ResolvedStage,
    SpecSettings,
    StageSpec,
    StrategySpec,
    TrackingSpec,
    architecture,
)
from dlpipe.spec.validation import spec_plugins, validate

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_DIGITS",
    "MAX_PROBLEMS",
    "MAX_VALUES",
    "TOP_LEVEL_KEYS",
    "ResolvedSpec",
    "ResolvedStage",
    "SpecError",
    "SpecSettings",
    "StageSpec",
    "StrategySpec",
    "TrackingSpec",
    "YamlDocument",
    "apply_overrides",
    "architecture",
    "flatten",
    "flatten_params",
    "load_yaml",
    "parse_override",
    "pydantic_problems",
    "read_spec_file",
    "resolve_path",
    "set_path",
    "spec_plugins",
    "stage_ids",
    "validate",
]
