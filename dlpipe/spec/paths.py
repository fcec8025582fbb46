"""Dotted paths into a spec, and ``--set`` overrides.

``--set`` overrides and the tune stage name values by dotted paths. The first part is
a top-level key (``seed``, ``tracking.uri``) or a stage name; the rest walks into that
stage's ``params``: ``train.epochs``, ``train.optimizer.learning_rate``,
``model.latent_dim``. A stage's name defaults to its kind. The parts after the first
are key names (letters, digits, ``_`` and ``-``); there is no ``[index]`` syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dlpipe.errors import DlpipeError, KeyPath, Location, SpecError, close_matches, format_path
from dlpipe.spec.document import YamlDocument, parse_yaml
from dlpipe.spec.settings import TOP_LEVEL_KEYS

if TYPE_CHECKING:
    from dlpipe.spec.settings import ResolvedSpec

#: Dotted-path parts are key names: letters, digits, '_' and '-'.
_PATH_PART = re.compile(r"[\w-]+")


def flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.path, value)`` leaves; stages are addressed by their name."""
    if isinstance(data, Mapping):
        if not data and prefix:
            yield prefix, {}
        for k, v in data.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        for i, v in enumerate(data):
            yield from flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, data


def flatten_params(resolved: ResolvedSpec) -> dict[str, Any]:
    """The resolved spec as ``{dotted.path: value}``, in the ``--set`` path syntax."""
    full = resolved.resolved_dict()
    out: dict[str, Any] = {}
    for key in ("name", "experiment", "seed", "precision"):
        out[key] = full[key]
    out["strategy"] = full["strategy"]["use"]
    for k, v in flatten(full["strategy"]["params"], "strategy"):
        out[k] = v
    for stage in full["stages"]:
        out[f"{stage['name']}.use"] = stage["use"]
        for k, v in flatten(stage["params"], stage["name"]):
            out[k] = v
    return out

def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` → ``("train.epochs", 3)``; the value is read as YAML, as in a
    spec file (dates stay text; depth and size are bounded)."""
    if "=" not in text:
        raise DlpipeError(
            f"--set {text!r}: expected PATH=VALUE, for example --set train.epochs=3"
        )
    path, _, value_text = text.partition("=")
    path = path.strip()
    if not path or any(not part for part in path.split(".")):
        raise DlpipeError(f"--set {text!r}: {path!r} is not a dotted path like train.epochs")
    if not value_text.strip():
        return path, ""
    try:
        doc = parse_yaml(value_text, f"--set {text}")
    except SpecError as exc:
        problem = exc.problems[0]
        if problem.message.startswith("invalid YAML: "):
            reason = problem.message.removeprefix("invalid YAML: ")
            raise DlpipeError(f"--set {text!r}: the value is not valid YAML: {reason}") from None
        hint = f" (expected {problem.expected})" if problem.expected else ""
        raise DlpipeError(f"--set {text!r}: {problem.message}{hint}") from None
    return path, None if doc is None else doc.data


def stage_ids(data: Mapping[str, Any]) -> list[str]:
    """The name of every stage in raw spec data, in order (a name defaults to the kind)."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return []
    ids = []
    for s in stages:
        if isinstance(s, Mapping):
            ids.append(str(s.get("name") or s.get("kind")))
    return ids


def _stage_position(data: Mapping[str, Any], stage_id: str) -> int | None:
    """The index in ``stages`` of the stage called ``stage_id``."""
    stages = data.get("stages")
    for index, s in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(s, Mapping) and str(s.get("name") or s.get("kind")) == stage_id:
            return index
    return None


def resolve_path(data: Mapping[str, Any], dotted: str) -> KeyPath:
    """Map a dotted path to a key path in the raw spec.

    ``train.optimizer.learning_rate`` → ``("stages", 2, "params", "optimizer",
    "learning_rate")``. Raises :class:`DlpipeError` naming close matches.
    """
    head, *rest = dotted.split(".")
    for part in rest:
        if not _PATH_PART.fullmatch(part):
            raise DlpipeError(
                f"path {dotted!r}: {part!r} is not a key name; a path is key names joined "
                "by dots, such as train.optimizer.learning_rate (no [index], quotes or spaces)"
            )
    if head in TOP_LEVEL_KEYS and head != "stages":
        if head == "strategy" and rest:
            return ("strategy", "params", *rest)
        return (head, *rest)
    ids = stage_ids(data)
    if head == "stages":
        raise DlpipeError(
            f"path {dotted!r}: the list of stages cannot be set by path; name a stage "
            "instead, as in train.epochs\n"
            f"    stages: {', '.join(ids) or 'none'}"
        )
    index = _stage_position(data, head)
    if index is not None:
        if not rest:
            raise DlpipeError(
                f"path {dotted!r} names stage {head!r} but no parameter; "
                f"use for example {head}.<param>=VALUE"
            )
        if rest == ["use"]:
            return ("stages", index, "use")
        return ("stages", index, "params", *rest)
    choices = [k for k in TOP_LEVEL_KEYS if k != "stages"] + ids
    matches = close_matches(head, choices)
    hint = f"; did you mean {', '.join(matches)}?" if matches else ""
    raise DlpipeError(
        f"path {dotted!r}: {head!r} is neither a top-level key nor a stage name{hint}\n"
        f"    available: {', '.join(choices)}"
    )


def set_path(data: Any, path: KeyPath, value: Any) -> None:
    """Set ``value`` at ``path`` in plain data, adding the mappings missing on the way."""
    node = data
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part]
        else:
            raise DlpipeError(f"cannot set {format_path(path)}: {format_path(path[:-1])} is not a mapping")
        if node is None:
            raise DlpipeError(f"cannot set {format_path(path)}: a parent is empty")
    last = path[-1]
    if isinstance(node, dict):
        if not isinstance(last, str):
            raise DlpipeError(f"cannot set {format_path(path)}")
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int):
        node[last] = value
    else:
        raise DlpipeError(
            f"cannot set {format_path(path)}: {format_path(path[:-1])} is not a mapping"
        )


def apply_overrides(doc: YamlDocument, overrides: Sequence[str]) -> None:
    """Apply ``--set`` overrides in place; their values are located on the command line."""
    if not isinstance(doc.data, dict):
        return
    for text in overrides:
        dotted, value = parse_override(text)
        path = resolve_path(doc.data, dotted)
        set_path(doc.data, path, value)
        doc.positions[path] = Location(f"--set {text}")
