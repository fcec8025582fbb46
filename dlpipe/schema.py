"""JSON Schema for pipeline specs, built from every registered plugin's params."""

from __future__ import annotations

from typing import Any

from dlpipe.plugins import Registry
from dlpipe.spec import SpecModel


def _params_schema(params: Any, defs: dict[str, Any]) -> dict[str, Any]:
    schema = params.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema


def spec_json_schema(registry: Registry) -> dict[str, Any]:
    """A draft 2020-12 schema; each stage is one of the registered (kind, use) pairs."""
    schema = SpecModel.model_json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    variants: list[dict[str, Any]] = []
    for kind in registry.kinds:
        for name in registry.stage_names(kind):
            entry = registry.lookup_stage(kind, name)
            assert entry is not None
            variants.append(
                {
                    "type": "object",
                    "title": f"{kind}: {name}",
                    "description": entry.description or f"{kind} stage {name} ({entry.plugin})",
                    "properties": {
                        "kind": {"const": kind},
                        "use": {"const": name},
                        "name": {"type": "string"},
                        "params": _params_schema(entry.params, defs),
                    },
                    "required": ["kind", "use"],
                    "additionalProperties": False,
                }
            )
    schema["properties"]["stages"] = {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": variants},
        "description": "Stages, run in order.",
    }
    defs.pop("StageSpec", None)
    strategies = [
        {
            "type": "object",
            "properties": {
                "use": {"const": name},
                "params": _params_schema(entry.params, defs),
            },
            "required": ["use"],
            "additionalProperties": False,
        }
        for name, entry in sorted(registry.strategies.items())
    ]
    schema["properties"]["strategy"] = {
        "anyOf": [{"enum": sorted(registry.strategies)}, *strategies],
        "default": "auto",
    }
    defs.pop("StrategySpec", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dlpipe pipeline spec"
    return schema
