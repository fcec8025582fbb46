"""pydantic's validation errors as located problems: key path, file position, what was
expected, what was found and close matches of a mistyped key."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from dlpipe.errors import KeyPath, Problem, close_matches
from dlpipe.spec.document import YamlDocument

#: Problems reported for one schema check (one stage's params, say); the rest are counted.
MAX_PROBLEMS = 50
#: What YAML 1.1 reads as a date; a spec keeps it as text but says what it is.
_DATE = re.compile(r"\d{4}-\d\d?-\d\d?([Tt ].*)?")


def describe(value: Any) -> str:
    """A value as a problem's "got" shows it: shortened, with its type."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value)))} digits (int)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str) and _DATE.fullmatch(value):
        return f"{text} (a date, kept as text)"
    return f"{text} ({type(value).__name__})"


def _expected_from_error(err: Mapping[str, Any]) -> str | None:
    """What a pydantic error says was expected, in a spec's words, where it says it."""
    etype = err.get("type", "")
    ctx = err.get("ctx") or {}
    simple = {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_parsing": "a number",
        "float_type": "a number",
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "string_type": "a string",
        "dict_type": "a mapping",
        "list_type": "a list",
        "model_type": "a mapping",
        "missing": "a value (this key is required)",
    }
    if etype in simple:
        return simple[etype]
    if etype in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[etype]
        bound = next(iter(ctx.values()), "?")
        return f"a number {op} {bound}"
    if etype == "literal_error":
        return f"one of {ctx.get('expected', '?')}"
    if etype == "enum":
        return f"one of {ctx.get('expected', '?')}"
    return None


def pydantic_problems(
    exc: ValidationError,
    model: type[BaseModel],
    base: KeyPath,
    doc: YamlDocument,
    label: str | None = None,
) -> list[Problem]:
    """Translate a pydantic error into located problems with suggestions."""
    problems: list[Problem] = []
    seen: set[tuple[KeyPath, str]] = set()
    found, data = _data_at(doc.data, base)
    errors = exc.errors(include_url=False)
    for i, err in enumerate(errors):
        if len(problems) == MAX_PROBLEMS:  # a part full of mistakes: summarise the rest
            problems.append(Problem(base, f"and {len(errors) - i} more errors in this part "
                                    "of the spec, not shown", doc.locate(base), label=label))
            break
        etype = err["type"]
        if found:
            loc = _key_path(data, err["loc"], missing=etype == "missing")
        else:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"function-after", "function-before"})))
        path = (*base, *loc)
        shown = _dotted_label(label, path)
        key = (path, etype)
        if key in seen:
            continue
        seen.add(key)
        if etype == "extra_forbidden" and loc:
            name = str(loc[-1])
            fields = _fields_at(model, err["loc"][:-1])
            problems.append(
                Problem(
                    path,
                    f"unknown key {name!r}",
                    doc.locate(path),
                    suggestions=close_matches(name, fields),
                    available=fields,
                    label=shown,
                )
            )
            continue
        problems.append(
            Problem(
                path,
                err["msg"],
                doc.locate(path),
                expected=_expected_from_error(err),
                got=None if etype == "missing" else describe(err.get("input")),
                label=shown,
            )
        )
    return problems


def _has(data: Any, part: Any) -> bool:
    """Whether ``part`` is a key of the mapping ``data`` or an index of the list ``data``."""
    if isinstance(data, dict):
        return part in data
    return isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)


def _data_at(data: Any, path: KeyPath) -> tuple[bool, Any]:
    """``(True, value)`` at ``path`` in ``data``, or ``(False, None)`` if it is not there."""
    for part in path:
        if not _has(data, part):
            return False, None
        data = data[part]
    return True, data


def _key_path(data: Any, loc: Sequence[Any], missing: bool) -> KeyPath:
    """The keys and indexes of ``data`` that a pydantic error location walks through.

    pydantic adds steps of its own (a union member such as ``str``, a validator such
    as ``function-after[...]``); they are not in the data and are skipped, whatever
    they are called, so a user's key may hold any character. The key of a
    ``missing`` error is not in the data either: it is kept as the last step.
    """
    path: list[str | int] = []
    for i, part in enumerate(loc):
        if _has(data, part):
            data = data[part]
        elif not (missing and i == len(loc) - 1 and isinstance(data, dict)):
            continue
        path.append(part)
    return tuple(path)


def _dotted_label(label: str | None, path: KeyPath) -> str | None:
    """``train.optimizer.learning_rate`` for a stage param: the --set / tune path."""
    if label and len(path) > 3 and path[0] == "stages" and path[2] == "params":
        return ".".join([label, *(str(p) for p in path[3:])])
    return label


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) model at ``loc``, for suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        f = current.model_fields.get(str(part))
        if f is None:
            continue  # a step of pydantic's own (a union member) or a key of a dict
        current = _model_in(f.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
