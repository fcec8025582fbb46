"""JSON Schema for pipeline specs, built from every registered plugin's params.

``dlpipe schema`` prints it for editors and tools such as ``check-jsonschema``.

Stages are discriminated on ``kind`` and ``use``. A stage's schema checks ``kind``
against the registered kinds, then (``if``/``then``) ``use`` against the names
registered for that kind, then ``params`` against that one plugin's params. A
validator therefore reports the key that is wrong (``'latent_dm' was unexpected``
at ``stages[1].params``), not why the stage fails to be each of the other hundred
stages, as one big ``anyOf`` of all stages makes it do.

The schema agrees with ``dlpipe validate`` in one direction: every spec that
validate accepts passes it. validate reads params in pydantic's lax mode, which
converts text and booleans to numbers (``batch_size: "32"``; ``1e-3``, which YAML
1.1 reads as text) and numbers and words such as ``yes`` to booleans; the schema
accepts the same inputs (:func:`_lax`). Making params strict instead would break
specs that run today. The other direction cannot hold entirely: the schema cannot
check what validate checks across stages (needs, references, the val/test
fractions' sum), nor the bounds of a number written as text. It catches misspelt
keys, unknown kinds and names, values of the wrong type and plain numbers out of
range.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dlpipe.plugins import Registry
from dlpipe.spec import SpecSettings, StageSpec, StrategySpec

#: Text that pydantic's lax mode reads as an integer: ``"32"``, ``" -3 "``, ``"1_000"``,
#: ``"3.00"``.
INT_TEXT = r"^\s*[+-]?[0-9]+(_[0-9]+)*(\.0+)?\s*$"
#: Text that it reads as a float: ``"0.5"``, ``"1e-3"``, ``".5"``, ``"1_000.5"``,
#: ``"inf"``, ``"nan"`` (any letter case). pydantic skips underscores among the digits
#: rather freely (``"1_e5"``, ``"._5"``); the pattern allows them anywhere there.
_DIGITS = "[0-9_]*[0-9][0-9_]*"
NUMBER_TEXT = (
    r"^\s*[+-]?("
    rf"({_DIGITS}(\.[0-9_]*)?|[0-9_]*\.{_DIGITS})([eE][+-]?{_DIGITS})?"
    r"|[iI][nN][fF]([iI][nN][iI][tT][yY])?|[nN][aA][nN]"
    r")\s*$"
)
#: Text that it reads as a boolean (any letter case).
BOOL_TEXT = r"^([tT]([rR][uU][eE])?|[fF]([aA][lL][sS][eE])?|[yY]([eE][sS])?|[nN][oO]?" \
    r"|[oO][nN]|[oO][fF][fF]|0|1)$"

#: JSON type -> what pydantic's lax mode also accepts for it, and the text it reads.
_LAX_TYPES: dict[str, tuple[list[str], str]] = {
    "integer": (["integer", "string", "boolean"], INT_TEXT),
    "number": (["number", "string", "boolean"], NUMBER_TEXT),
    "boolean": (["boolean", "integer", "string"], BOOL_TEXT),
}
#: Keywords whose values are data, not schemas.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def spec_json_schema(registry: Registry) -> dict[str, Any]:
    """A draft 2020-12 schema of pipeline specs with the plugins of ``registry``."""
    stage_params: dict[tuple[str, str], type[BaseModel]] = {}
    descriptions: dict[tuple[str, str], str] = {}
    for kind in registry.kinds:
        for name in registry.stage_names(kind):
            entry = registry.lookup_stage(kind, name)
            assert entry is not None
            stage_params[(kind, name)] = entry.params
            descriptions[(kind, name)] = entry.description or f"{kind} stage {name} ({entry.plugin})"
    strategy_params = {name: entry.params for name, entry in registry.strategies.items()}

    # One call for every model, so that pydantic gives clashing class names distinct $defs.
    models: list[type[BaseModel]] = [
        SpecSettings, StageSpec, *stage_params.values(), *strategy_params.values()
    ]
    unique = list(dict.fromkeys(models))
    refs, top = models_json_schema(
        [(m, "validation") for m in unique], union_format="primitive_type_array"
    )
    defs: dict[str, Any] = top.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return dict(refs[(model, "validation")])

    schema = defs.pop(ref(SpecSettings)["$ref"].split("/")[-1])
    stage = defs.pop(ref(StageSpec)["$ref"].split("/")[-1])
    defs.pop(StrategySpec.__name__, None)
    schema["properties"]["stages"] = {
        "type": "array",
        "minItems": 1,
        "items": _stage_schema(registry, stage, {k: ref(m) for k, m in stage_params.items()},
                               descriptions),
        "description": "Stages, run in order.",
    }
    schema["properties"]["strategy"] = _strategy_schema(
        {name: ref(m) for name, m in strategy_params.items()},
        schema["properties"]["strategy"].get("description"),
    )
    schema["$defs"] = defs
    schema = _lax(schema)
    schema = _by_type(schema, schema["$defs"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dlpipe pipeline spec",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def _stage_schema(
    registry: Registry,
    stage: dict[str, Any],
    params: dict[tuple[str, str], dict[str, Any]],
    descriptions: dict[tuple[str, str], str],
) -> dict[str, Any]:
    """One stage: ``kind`` from the registered kinds, ``use`` from that kind's names,
    ``params`` from that (kind, use)'s params class."""
    properties = dict(stage["properties"])
    properties["kind"] = {**properties["kind"], "enum": registry.kinds}
    properties["kind"].pop("type", None)
    properties["params"] = {
        "type": "object",
        "description": "The parameters of the plugin named by use.",
    }
    rules: list[dict[str, Any]] = []
    for kind in registry.kinds:
        rules.append({
            "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
            "then": {"properties": {"use": {"enum": registry.stage_names(kind)}}},
        })
    for (kind, name), params_ref in params.items():
        rules.append({
            "if": {
                "properties": {"kind": {"const": kind}, "use": {"const": name}},
                "required": ["kind", "use"],
            },
            "then": {
                "title": f"{kind}: {name}",
                "description": descriptions[(kind, name)],
                "properties": {"params": params_ref},
            },
        })
    return {
        "type": "object",
        "description": stage.get("description", ""),
        "properties": properties,
        "required": stage.get("required", ["kind", "use"]),
        "additionalProperties": False,
        "allOf": rules,
    }


def _strategy_schema(params: dict[str, dict[str, Any]], description: str | None) -> dict[str, Any]:
    """A strategy name, or ``{use, params}`` (``use`` defaults to ``auto``)."""
    names = sorted(params)
    rules: list[dict[str, Any]] = [
        {
            "if": {"properties": {"use": {"const": name}}, "required": ["use"]},
            "then": {"properties": {"params": params[name]}},
        }
        for name in names
    ]
    if "auto" in params:  # what validate does when use is left out
        rules.append({"if": {"not": {"required": ["use"]}},
                      "then": {"properties": {"params": params["auto"]}}})
    return {
        "description": description or "Distribution strategy.",
        "default": "auto",
        "type": ["string", "object"],
        "if": {"type": "string"},
        "then": {"enum": names},
        "else": {
            "properties": {
                "use": {"enum": names, "default": "auto"},
                "params": {"type": "object"},
            },
            "additionalProperties": False,
            "allOf": rules,
        },
    }


def _lax(node: Any) -> Any:
    """``node`` with every integer, number and boolean schema widened to what pydantic's
    lax mode converts to that type (see the module docstring).

    Bounds such as ``minimum`` apply to JSON numbers only and ``pattern`` to strings
    only, so ``{"type": ["integer", "string", "boolean"], "minimum": 1, "pattern":
    INT_TEXT}`` reads: an integer of at least 1, text of an integer, or a boolean.
    Schemas with ``enum`` or ``const`` keep their exact values.
    """
    if isinstance(node, list):
        return [_lax(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _DATA_KEYWORDS else _lax(value) for key, value in node.items()}
    declared = out.get("type")
    types = [declared] if isinstance(declared, str) else declared
    if not isinstance(types, list) or {"enum", "const"} & out.keys():
        return out
    widened = [t for t in types if t in _LAX_TYPES]
    if not widened:
        return out
    out["type"] = list(dict.fromkeys([*types, *(t for w in widened for t in _LAX_TYPES[w][0])]))
    if "string" not in types:  # text must read as one of the declared types
        out["pattern"] = "|".join(_LAX_TYPES[w][1] for w in widened)
    if widened == ["boolean"] and not {"integer", "number"} & set(types):
        out.update(minimum=0, maximum=1)  # the numbers that read as booleans
    return out


def _by_type(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with unions a validator can tell apart by a value's type or tag
    rewritten so that it checks only the matching alternative.

    A validator reports a value that fits no alternative of an ``anyOf`` or ``oneOf``
    with every alternative's complaint, and picks one of them to show first:
    ``{'monitor': ..., 'patients': 3} is not of type 'null'`` for an
    ``EarlyStoppingParams | None`` with a misspelt key. Here, when the alternatives
    take different JSON types, each is applied ``if`` the value has its types, and a
    pydantic discriminated union (``discriminator.propertyName``) is applied by its
    tag, so the report is the one from the alternative that was meant:
    ``Additional properties are not allowed ('patients' was unexpected)``.
    """
    if isinstance(node, list):
        return [_by_type(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _DATA_KEYWORDS else _by_type(value, defs)
           for key, value in node.items()}
    tag = out.get("discriminator", {})
    if "oneOf" in out and isinstance(tag, dict) and isinstance(tag.get("mapping"), dict):
        prop, mapping = tag["propertyName"], tag["mapping"]
        del out["oneOf"], out["discriminator"]
        out.update(
            type="object",
            required=[prop],
            properties={prop: {"enum": list(mapping)}},
            allOf=[{"if": {"properties": {prop: {"const": value}}, "required": [prop]},
                    "then": {"$ref": ref}} for value, ref in mapping.items()],
        )
        return out
    branches = out.get("anyOf")
    if not isinstance(branches, list):
        return out
    types = [_json_types(branch, defs) for branch in branches]
    if any(t is None for t in types):
        return out
    seen: set[str] = set()
    for branch_types in types:
        assert branch_types is not None
        widened = {"number" if t == "integer" else t for t in branch_types}
        if widened & seen:
            return out  # two alternatives take the same type: leave the anyOf
        seen |= widened
    del out["anyOf"]
    out["type"] = [t for branch_types in types for t in branch_types or []]
    rules = [{"if": {"type": branch_types}, "then": branch}
             for branch, branch_types in zip(branches, types, strict=True)
             if set(branch) != {"type"}]  # a bare type needs no rule beyond out["type"]
    if rules:
        out["allOf"] = [*out.get("allOf", []), *rules]
    return out


_PYTHON_TO_JSON = {bool: "boolean", int: "integer", float: "number", str: "string",
                   list: "array", dict: "object", type(None): "null"}


def _json_types(schema: Any, defs: dict[str, Any], depth: int = 0) -> list[str] | None:
    """The JSON types ``schema`` admits, or None where that is not plain to see."""
    if not isinstance(schema, dict) or depth > 20:
        return None
    if "$ref" in schema:
        target = defs.get(str(schema["$ref"]).rsplit("/", 1)[-1])
        return _json_types(target, defs, depth + 1)
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return list(declared)
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list):
        found = [_PYTHON_TO_JSON.get(type(v)) for v in values]
        return None if None in found else list(dict.fromkeys(t for t in found if t))
    return None
