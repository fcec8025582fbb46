"""Pipeline specs: loading YAML with positions, overrides, and validation.

A spec is validated in full before anything heavy starts: its structure, that every
``use:`` names a registered plugin, and every plugin's ``params`` against that
plugin's schema, and that every stage's needs are provided by a stage before it. All
problems are reported together, each with file, line, key path, what was expected,
what was found and close matches.

Loading is safe and bounded, so that validation answers any input with a message and
never with a crash or a hang: only plain YAML values (a date stays text), at most
:data:`MAX_DEPTH` levels of nesting and :data:`MAX_VALUES` values with aliases
expanded, UTF-8 files of at most :data:`MAX_BYTES` bytes.

Dotted paths
    ``--set`` overrides and the tune stage name values by dotted paths. The first part is
    a top-level key (``seed``, ``tracking.uri``) or a stage name; the rest walks into
    that stage's ``params``: ``train.epochs``, ``train.optimizer.learning_rate``,
    ``model.latent_dim``. A stage's name defaults to its kind. The parts after the first
    are key names (letters, digits, ``_`` and ``-``); there is no ``[index]`` syntax.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlpipe.errors import (
    DlpipeError,
    KeyPath,
    Location,
    Problem,
    SpecError,
    close_matches,
    format_path,
)
from dlpipe.params import Params
from dlpipe.plugins import STAGE_DEFAULTS, Registry

# --------------------------------------------------------------------------------------
# YAML with positions
# --------------------------------------------------------------------------------------

#: Plain values only: no dates (``2024-02-03`` stays text), no binary, no Python objects.
_SAFE_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
}
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_TAG_NAMES = {
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "true or false",
    "tag:yaml.org,2002:map": "a mapping",
    "tag:yaml.org,2002:seq": "a list",
}
#: Bounds on what a spec may hold, so that a broken or hostile file fails with a
#: message instead of exhausting the stack or memory: aliases let a 2 KB file stand
#: for billions of values ("billion laughs").
MAX_DEPTH = 64
MAX_VALUES = 100_000
MAX_BYTES = 128_000
#: Problems reported for one schema check (one stage's params, say); the rest are counted.
MAX_PROBLEMS = 50
#: Integers longer than this are refused (Python cannot even print 4300 digits).
MAX_DIGITS = 300
#: Dotted-path parts are key names: letters, digits, '_' and '-'.
_PATH_PART = re.compile(r"[\w-]+")


class YamlDocument:
    """Plain data from a YAML file plus the location of every key path in it."""

    def __init__(self, data: Any, positions: dict[KeyPath, Location], source: str) -> None:
        self.data = data
        self.positions = positions
        self.source = source

    def locate(self, path: KeyPath) -> Location | None:
        """The location of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.positions:
                return self.positions[path]
            if not path:
                return None
            path = path[:-1]


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a spec may not hold (too deep, too large, a recursive alias)."""

    def __init__(self, problem: str, mark: yaml.Mark, path: KeyPath, expected: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.path = path
        self.expected = expected


@dataclass
class _Open:
    """A mapping or list being composed: its anchor, key path, and what it holds so far."""

    anchor: str | None
    path: KeyPath
    values: int = 1
    depth: int = 1


class _SpecLoader(yaml.SafeLoader):
    """The safe loader without dates (they stay text), that measures while composing.

    It refuses, before Python's stack or memory run out, a nesting deeper than
    :data:`MAX_DEPTH`, an alias inside the value it names, and aliases that expand
    the document past :data:`MAX_VALUES` values. Depth and size count what aliases
    stand for, measured once per anchored node, never by expanding them.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.open: list[_Open] = []
        self.total = 0  # values composed so far, aliases counted as what they repeat
        self.measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        path = self._child_path(index)
        alias = f"*{event.anchor}" if isinstance(event, yaml.AliasEvent) else None
        if alias and any(o.anchor == event.anchor for o in self.open):
            raise _Refused(
                f"the alias {alias} is used inside the value it names, so that value would "
                "contain itself forever",
                event.start_mark, path, "an alias to a value defined before, outside it",
            )
        is_collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if is_collection:
            if len(self.open) >= MAX_DEPTH:
                raise _Refused(
                    f"the spec nests deeper than {MAX_DEPTH} levels here",
                    event.start_mark, path, f"at most {MAX_DEPTH} nested mappings and lists",
                )
            self.open.append(_Open(event.anchor, path))
            self._count(1, event, path, None)
        try:
            node = super().compose_node(parent, index)
        finally:
            done = self.open.pop() if is_collection else None
        if done is not None:
            self.measured[id(node)] = (done.values, done.depth)
        values, depth = self.measured.get(id(node), (1, 0))
        if not is_collection:
            self._count(values, event, path, alias)
        if self.open:
            into = self.open[-1]
            into.values += values
            into.depth = max(into.depth, depth + 1)
            if len(self.open) + depth > MAX_DEPTH:
                raise _Refused(
                    f"the alias {alias} nests the spec deeper than {MAX_DEPTH} levels",
                    event.start_mark, path, f"at most {MAX_DEPTH} nested mappings and lists",
                )
        return node

    def _count(self, values: int, event: Any, path: KeyPath, alias: str | None) -> None:
        self.total += values
        if self.total > MAX_VALUES:
            what = f"the alias {alias} stands for {values:,} values; with it " if alias else ""
            raise _Refused(
                f"{what}the spec holds more than {MAX_VALUES:,} values",
                event.start_mark, path,
                f"at most {MAX_VALUES:,} values, counting each alias as the values it repeats",
            )

    def _child_path(self, index: Any) -> KeyPath:
        if not self.open:
            return ()
        base = self.open[-1].path
        if isinstance(index, int):
            return (*base, index)
        if isinstance(index, yaml.ScalarNode):
            return (*base, str(index.value))
        return base  # a mapping's key, or a key that is not a plain name


def _parse(text: str, source: str) -> YamlDocument | None:
    """Parse one YAML document safely; ``None`` when it holds nothing."""
    positions: dict[KeyPath, Location] = {}
    problems: list[Problem] = []

    def loc(n: yaml.Node) -> Location:
        return Location(source, n.start_mark.line + 1, n.start_mark.column + 1)

    try:
        loader = _SpecLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        raise SpecError(source, [_reader_problem(exc, text, source)]) from None
    try:
        node = loader.get_single_node()
    except _Refused as exc:
        mark = exc.problem_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        # The first few keys say where; the line and column say exactly.
        raise SpecError(source, [Problem(exc.path[:6], str(exc.problem), where,
                                         expected=exc.expected)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        problem = str(exc.problem)
        if exc.context and problem.startswith("but "):  # "expected a single document ..."
            problem = f"{exc.context} {problem}"
        raise SpecError(source, [Problem((), f"invalid YAML: {problem}", where)]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [Problem((), f"invalid YAML: {exc}", Location(source))]) from None
    finally:
        loader.dispose()
    if node is None:
        return None

    def refuse_tag(n: yaml.Node, path: KeyPath) -> bool:
        if n.tag in _SAFE_TAGS:
            return False
        if n.tag == _TIMESTAMP_TAG:
            message = "the YAML tag '!!timestamp' is not allowed: dates are written as text"
        else:
            message = f"the YAML tag {_shown_tag(n.tag)!r} is not allowed"
        problems.append(Problem(path, message, loc(n),
                                expected="plain YAML values (only safe loading is supported)"))
        return True

    def scalar(n: yaml.Node, path: KeyPath) -> Any:
        if not isinstance(n, yaml.ScalarNode):
            kind = "list" if isinstance(n, yaml.SequenceNode) else "mapping"
            problems.append(Problem(path, f"the YAML tag {_shown_tag(n.tag)!r} does not fit a {kind}",
                                    loc(n), expected="no tag on a list or mapping"))
            return None
        what = _TAG_NAMES.get(n.tag, "a value")
        if n.tag == "tag:yaml.org,2002:int" and len(n.value) > MAX_DIGITS:
            problems.append(Problem(path, f"the number has {len(n.value)} digits", loc(n),
                                    expected=f"a number of at most {MAX_DIGITS} digits"))
            return None
        try:
            value = loader.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, TypeError):
            problems.append(Problem(path, f"{_short(n.value)!r} cannot be read as {what}",
                                    loc(n), expected=what))
            return None
        if isinstance(value, str) and not _is_text(value):
            problems.append(Problem(path, "the text holds a lone surrogate (an escape in "
                                    "\\ud800-\\udfff), which is not a character", loc(n),
                                    expected="text of Unicode characters"))
            return None
        return value

    def build(n: yaml.Node, path: KeyPath) -> Any:
        positions.setdefault(path, loc(n))
        if refuse_tag(n, path):
            return None
        if isinstance(n, yaml.MappingNode) and n.tag == "tag:yaml.org,2002:map":
            out: dict[str, Any] = {}
            for key_node, value_node in n.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    problems.append(Problem(path, "YAML merge keys ('<<') are not supported", loc(key_node)))
                    continue
                if refuse_tag(key_node, path):
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append(Problem(path, "a key must be a name, not a list or mapping",
                                            loc(key_node), expected="a plain key such as 'epochs'"))
                    continue
                key = str(key_node.value)
                if not _is_text(key):
                    problems.append(Problem(path, "a key holds a lone surrogate, which is not "
                                            "a character", loc(key_node), expected="a plain key"))
                    continue
                child = (*path, key)
                if key in out:
                    first = positions.get(child)
                    problems.append(
                        Problem(
                            child,
                            f"duplicate key {key!r}"
                            + (f" (first defined on line {first.line})" if first else ""),
                            loc(key_node),
                        )
                    )
                    continue
                positions[child] = loc(key_node)
                out[key] = build(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode) and n.tag == "tag:yaml.org,2002:seq":
            return [build(item, (*path, i)) for i, item in enumerate(n.value)]
        return scalar(n, path)

    data = build(node, ())
    if problems:
        raise SpecError(source, problems)
    return YamlDocument(data, positions, source)


def _reader_problem(exc: yaml.reader.ReaderError, text: str, source: str) -> Problem:
    before = text[: exc.position]
    line = before.count("\n") + 1
    column = exc.position - (before.rfind("\n") + 1) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return Problem((), f"invalid YAML: the character U+{char:04X} is not allowed in YAML text",
                   Location(source, line, column), expected="printable text")


def _shown_tag(tag: str) -> str:
    """``tag:yaml.org,2002:binary`` as a spec writes it: ``!!binary``."""
    return tag.replace("tag:yaml.org,2002:", "!!")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(text: str, source: str) -> YamlDocument:
    """Parse YAML safely: only plain values (dates stay text), no duplicate keys,
    bounded depth and size, positions recorded."""
    doc = _parse(text, source)
    if doc is None:
        raise SpecError(source, [Problem((), "the file is empty", Location(source, 1, 1))])
    return doc


def read_spec_file(path: str | Path) -> YamlDocument:
    p = Path(path)
    try:
        exists = p.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        reason = getattr(exc, "strerror", None) or exc
        raise DlpipeError(f"cannot read spec file {str(path)!r}: {reason}") from None
    if not exists:
        hint = ""
        parent = p.parent if str(p.parent) else Path(".")
        if parent.is_dir():
            names = [c.name for c in parent.glob("*.y*ml")]
            matches = close_matches(p.name, names)
            if matches:
                hint = f"; did you mean {', '.join(str(parent / m) for m in matches)}?"
            elif names:
                hint = f"; specs in {parent}: {', '.join(sorted(names))}"
        raise DlpipeError(f"spec file {str(path)!r} does not exist{hint}")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise DlpipeError(f"cannot read spec file {str(path)!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise SpecError(str(path), [Problem(
            (), f"the file is larger than {MAX_BYTES:,} bytes", Location(str(path)),
            expected="a pipeline spec (a few kilobytes of YAML)",
        )])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, exc.start) + 1 : exc.start].decode("utf-8", "replace")) + 1
        problem = Problem(
            (), f"the file is not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded",
            Location(str(path), line, column), expected="a YAML file saved as UTF-8",
        )
        raise SpecError(str(path), [problem]) from None
    return load_yaml(text, str(path))


# --------------------------------------------------------------------------------------
# Structure of a spec
# --------------------------------------------------------------------------------------

TOP_LEVEL_KEYS = (
    "name", "experiment", "seed", "precision", "strategy", "tracking", "plugins", "stages"
)


class TrackingSpec(BaseModel):
    """Where and how the run is tracked."""

    # ``register`` is the spec's key; the field has another name because pydantic's
    # BaseModel has a ``register`` attribute.
    model_config = ConfigDict(extra="forbid", validate_by_name=False, serialize_by_alias=True)

    class Registration(BaseModel):
        """Register the run's model in the MLflow model registry."""

        model_config = ConfigDict(extra="forbid", regex_engine="python-re")

        name: str = Field(
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$",
            description="Registered model name (letters, digits, '_', '-', '.'); the "
            "run's model becomes its next version.",
        )
        alias: str | None = Field(
            None,
            pattern=r"^(?![vV][0-9]+$)(?![Ll][Aa][Tt][Ee][Ss][Tt]$)[A-Za-z0-9_-]{1,255}$",
            description="Alias moved to the new version, e.g. champion (then "
            "models:/NAME@champion loads it). Not 'latest', not like a version (v3).",
        )

    enabled: bool = Field(True, description="Track the run in MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlruns/mlflow.db.",
    )
    artifact_location: str | None = Field(
        None, description="Artifact root for new experiments. Default: mlruns/artifacts."
    )
    run_name: str | None = Field(None, description="MLflow run name. Default: the spec's name.")
    attach_run_id: str | None = Field(
        None,
        description="Log into this existing MLflow run instead of starting one, and leave "
        "it open. Tune workers started by --workers use it to nest their trials under "
        "the study's run.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra run tags.")
    log_model: bool = Field(
        True,
        description="Log the trained model as an MLflow model under the artifact path "
        "`model` (Keras and pyfunc flavours, model.keras, a TF SavedModel); see "
        "docs/using-models.md.",
    )
    export: bool = Field(
        True,
        description="Add inference-only exports to the logged model: a TF SavedModel "
        "(and ONNX where tf2onnx is installed), for the architectures that export.",
    )
    registration: Registration | None = Field(
        None,
        alias="register",
        description="Register the logged model: {name: NAME, alias: champion} makes it "
        "the next version of NAME and points the alias at it.",
    )
    mlflow_flavor: bool = Field(
        False,
        description="Deprecated and ignored: the logged model always has the MLflow "
        "Keras flavour.",
    )

    def model_post_init(self, context: Any) -> None:
        if self.registration is not None and not self.log_model:
            raise ValueError("register needs log_model: true (the logged model is registered)")


class StrategySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use: str = "auto"
    params: dict[str, Any] = Field(default_factory=dict)


class StageSpec(BaseModel):
    """One stage: its kind, the plugin implementing it, and that plugin's params."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="data, augment, model, train, evaluate, tune, ...")
    use: str = Field(description="The registered implementation (for model: the architecture).")
    name: str | None = Field(
        None, description="Name used in dotted paths (--set NAME.param=...). Default: the kind."
    )
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name or self.kind


class SpecSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Pipeline name; also the default MLflow run name.")
    experiment: str | None = Field(None, description="MLflow experiment. Default: the name.")
    seed: int = Field(
        0, ge=0, lt=2**32, description="Global seed for Python, NumPy and the backend."
    )
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32",
        description="Keras dtype policy. mixed_float16 computes in float16 with float32 "
        "weights and dynamic loss scaling (models with their own train_step apply it too).",
    )
    strategy: str | StrategySpec = Field(
        "auto", description="Distribution strategy: auto, cpu, one_device, mirrored, ..."
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    plugins: list[str] = Field(
        default_factory=list, description="Extra plugins: module names or .py paths."
    )
    stages: list[StageSpec] = Field(min_length=1)


@dataclass
class ResolvedStage:
    """A validated stage, with its parameters parsed by its plugin's schema."""

    spec: StageSpec
    params: Params
    plugin: str
    index: int

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def use(self) -> str:
        return self.spec.use


@dataclass
class ResolvedSpec:
    """A spec that passed validation."""

    source: str
    raw: dict[str, Any]  # after overrides, as plain data
    settings: SpecSettings
    stages: list[ResolvedStage]
    strategy_name: str
    strategy_params: Params
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def experiment(self) -> str:
        return self.settings.experiment or self.settings.name

    def stage(self, stage_id: str) -> ResolvedStage | None:
        return next((s for s in self.stages if s.id == stage_id), None)

    def resolved_dict(self) -> dict[str, Any]:
        """The full spec with every default filled in, as plain data."""
        out = self.settings.model_dump(mode="json", exclude={"stages", "strategy"})
        out["strategy"] = {
            "use": self.strategy_name,
            "params": self.strategy_params.model_dump(mode="json"),
        }
        out["stages"] = [
            {
                "kind": s.kind,
                "use": s.use,
                "name": s.id,
                "params": s.params.model_dump(mode="json"),
            }
            for s in self.stages
        ]
        return out

    def digest(self) -> str:
        """A short hash of what determines the training (tracking settings excluded)."""
        d = self.resolved_dict()
        d.pop("tracking", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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


# --------------------------------------------------------------------------------------
# Overrides: --set path=value
# --------------------------------------------------------------------------------------


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
        doc = _parse(value_text, f"--set {text}")
    except SpecError as exc:
        problem = exc.problems[0]
        if problem.message.startswith("invalid YAML: "):
            reason = problem.message.removeprefix("invalid YAML: ")
            raise DlpipeError(f"--set {text!r}: the value is not valid YAML: {reason}") from None
        hint = f" (expected {problem.expected})" if problem.expected else ""
        raise DlpipeError(f"--set {text!r}: {problem.message}{hint}") from None
    return path, None if doc is None else doc.data


def stage_ids(data: Mapping[str, Any]) -> list[str]:
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


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


#: What YAML 1.1 reads as a date; a spec keeps it as text but says what it is.
_DATE = re.compile(r"\d{4}-\d\d?-\d\d?([Tt ].*)?")


def _describe(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value)))} digits (int)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str) and _DATE.fullmatch(value):
        return f"{text} (a date, kept as text)"
    return f"{text} ({type(value).__name__})"


def _expected_from_error(err: Mapping[str, Any]) -> str | None:
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
                got=None if etype == "missing" else _describe(err.get("input")),
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


def validate(doc: YamlDocument, registry: Registry, overrides: Sequence[str] = ()) -> ResolvedSpec:
    """Validate a loaded spec against the registry; raise :class:`SpecError` listing
    every problem."""
    source = doc.source
    data = doc.data
    if not isinstance(data, dict):
        raise SpecError(
            source,
            [Problem((), "a pipeline spec must be a mapping", doc.locate(()),
                     expected=f"a mapping with keys {', '.join(TOP_LEVEL_KEYS)}",
                     got=_describe(data))],
        )
    problems: list[Problem] = []
    raw_stages = data.get("stages")
    top_data = {k: v for k, v in data.items() if k != "stages"}
    top: SpecSettings | None = None
    try:
        top = SpecSettings.model_validate({**top_data, "stages": [{"kind": "-", "use": "-"}]})
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, SpecSettings, (), doc))
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(
            Problem(("stages",), "the spec needs a non-empty list of stages",
                    doc.locate(("stages",)),
                    expected="a list of {kind, use, params} mappings",
                    got="nothing" if raw_stages is None else _describe(raw_stages))
        )
        raw_stages = []

    seen_ids: dict[str, int] = {}
    stage_specs: list[StageSpec] = []
    stages: list[ResolvedStage] = []
    for index, raw_stage in enumerate(raw_stages):
        base: KeyPath = ("stages", index)
        try:
            stage = StageSpec.model_validate(raw_stage)
        except ValidationError as exc:
            label = raw_stage.get("name") or raw_stage.get("kind") if isinstance(raw_stage, dict) else None
            problems.extend(pydantic_problems(exc, StageSpec, base, doc, label and str(label)))
            continue
        stage_specs.append(stage)
        label = stage.id
        if stage.id in TOP_LEVEL_KEYS:
            problems.append(Problem((*base, "name"), f"stage name {stage.id!r} clashes with a top-level key", doc.locate((*base, "name")), expected="another name", label=label))
        if stage.id in seen_ids:
            problems.append(
                Problem(
                    (*base, "name") if stage.name else (*base, "kind"),
                    f"two stages are called {stage.id!r} (stages[{seen_ids[stage.id]}] too)",
                    doc.locate((*base, "name") if stage.name else base),
                    expected="unique stage names; add 'name:' to one of them",
                    label=label,
                )
            )
        seen_ids.setdefault(stage.id, index)
        if stage.kind not in registry.kinds:
            problems.append(
                Problem(
                    (*base, "kind"),
                    f"unknown stage kind {stage.kind!r}",
                    doc.locate((*base, "kind")),
                    suggestions=close_matches(stage.kind, registry.kinds),
                    available=registry.kinds,
                    label=label,
                )
            )
            continue
        entry = registry.lookup_stage(stage.kind, stage.use)
        if entry is None:
            names = registry.stage_names(stage.kind)
            what = "architecture" if stage.kind == "model" else f"{stage.kind} stage"
            problems.append(
                Problem(
                    (*base, "use"),
                    f"unknown {what} {stage.use!r}",
                    doc.locate((*base, "use")),
                    suggestions=close_matches(stage.use, names),
                    available=names,
                    label=label,
                )
            )
            continue
        try:
            params = entry.params.model_validate(stage.params)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, entry.params, (*base, "params"), doc, label))
            continue
        stages.append(ResolvedStage(stage, params, entry.plugin, index))

    if top is None:
        raise SpecError(source, problems)
    model = top.model_copy(update={"stages": stage_specs})
    strategy = model.strategy if isinstance(model.strategy, StrategySpec) else StrategySpec(use=model.strategy)
    strategy_params: Params | None = None
    s_entry = registry.strategies.get(strategy.use)
    s_path: KeyPath = ("strategy", "use") if isinstance(model.strategy, StrategySpec) else ("strategy",)
    if s_entry is None:
        names = sorted(registry.strategies)
        problems.append(
            Problem(s_path, f"unknown strategy {strategy.use!r}", doc.locate(s_path),
                    suggestions=close_matches(strategy.use, names), available=names)
        )
    else:
        try:
            strategy_params = s_entry.params.model_validate(strategy.params)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, s_entry.params, ("strategy", "params"), doc))

    problems.extend(_needs_problems(raw_stages, registry, doc))
    problems.extend(_cross_stage_problems(stages, registry, doc))
    problems.extend(_driver_problems(stages, registry, doc))
    problems.extend(_reference_problems(stages, registry, doc))
    if problems:
        raise SpecError(source, problems)
    assert strategy_params is not None
    return ResolvedSpec(
        source=source,
        raw=data,
        settings=model,
        stages=stages,
        strategy_name=strategy.use,
        strategy_params=strategy_params,
        overrides=list(overrides),
    )


def _needs_problems(raw_stages: list[Any], registry: Registry, doc: YamlDocument) -> list[Problem]:
    """Every stage's needs (see ``register(..., needs=...)``) must be provided by a stage
    listed before it: model after data, train after model, evaluate after a model."""
    contracts = []  # (index, stage id, "id (kind/use)", entry or None, provides)
    for index, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            continue  # reported by the structure checks
        kind, use = raw["kind"], raw.get("use")
        stage_id = str(raw.get("name") or kind)
        entry = registry.lookup_stage(kind, use) if isinstance(use, str) else None
        provides = entry.provides if entry else STAGE_DEFAULTS.get(kind, ((), ()))[1]
        contracts.append((index, stage_id, f"{stage_id} ({kind}/{use})", entry, provides))

    problems: list[Problem] = []
    provided: set[str] = set()
    for n, (index, stage_id, _, entry, provides) in enumerate(contracts):
        missing = []
        if entry is not None and not (entry.runs_previous and index == 0):
            missing = [need for need in entry.needs if need not in provided]
        if missing:
            earlier = [shown for _, _, shown, _, _ in contracts[:n]]
            wanted = " and ".join(repr(need) for need in missing)
            path: KeyPath = ("stages", index, "kind")
            problems.append(Problem(
                path,
                f"stage {stage_id!r} needs {wanted}, which no stage before it provides",
                doc.locate(path),
                expected="; ".join(_how_to_provide(need, stage_id, contracts[n + 1:], registry)
                                   for need in missing),
                got=f"before it: {', '.join(earlier)}" if earlier else "no stage before it",
                label=stage_id,
            ))
        provided.update(provides)
    return problems


def _how_to_provide(need: str, stage_id: str, later: list[Any], registry: Registry) -> str:
    mover = next((c for c in later if need in c[4]), None)
    if mover is not None:
        return f"stage {mover[1]!r} (stages[{mover[0]}], provides {need!r}) moved before {stage_id!r}"
    kinds = registry.providers(need)
    if kinds:
        return f"a {' or '.join(kinds)} stage before {stage_id!r} (it provides {need!r})"
    return f"a stage that provides {need!r} before {stage_id!r} (no registered stage does)"


def _cross_stage_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """Checks that need more than one stage: loss-weight names against the model."""
    problems: list[Problem] = []
    model_stage = next((s for s in stages if s.kind == "model"), None)
    model_entry = registry.models.get(model_stage.use) if model_stage else None
    for stage in stages:
        weights = getattr(stage.params, "loss_weights", None)
        if not weights or model_entry is None or not model_entry.loss_weights:
            continue
        for term in weights:
            if term not in model_entry.loss_weights:
                path: KeyPath = ("stages", stage.index, "params", "loss_weights", term)
                problems.append(
                    Problem(
                        path,
                        f"model {model_entry.name!r} has no loss term {term!r}",
                        doc.locate(path),
                        suggestions=close_matches(term, model_entry.loss_weights),
                        available=list(model_entry.loss_weights),
                        label=stage.id,
                    )
                )
    return problems


def _driver_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """At most one stage may drive the stages before it, and it needs some."""
    problems: list[Problem] = []
    drivers = []
    for stage in stages:
        entry = registry.lookup_stage(stage.kind, stage.use)
        if entry is not None and entry.runs_previous:
            drivers.append(stage)
    for extra in drivers[1:]:
        path: KeyPath = ("stages", extra.index, "kind")
        problems.append(Problem(
            path, f"only one stage may run the stages before it; {drivers[0].id!r} already does",
            doc.locate(path), expected="a single tune stage", label=extra.id))
    if drivers and drivers[0].index == 0:
        path = ("stages", 0, "kind")
        problems.append(Problem(
            path, f"stage {drivers[0].id!r} runs the stages before it, but it is the first",
            doc.locate(path), expected="data, model and train stages before it",
            label=drivers[0].id))
    return problems


def _reference_problems(
    stages: list[ResolvedStage], registry: Registry, doc: YamlDocument
) -> list[Problem]:
    """Check the dotted paths that params name (a search space): each must point into
    an earlier stage, and that stage must accept every value it may be given."""
    problems: list[Problem] = []
    data = doc.data
    by_index = {s.index: s for s in stages}
    model_stage = next((s for s in stages if s.kind == "model"), None)
    model_entry = registry.models.get(model_stage.use) if model_stage else None
    for stage in stages:
        for dotted, values in stage.params.spec_references().items():
            where = _key_naming(doc, stage.index, dotted)
            label = f"{stage.id}: {dotted}"

            def problem(message: str, **kw: Any) -> None:
                problems.append(Problem(where, message, doc.locate(where), label=label, **kw))  # noqa: B023

            try:
                path = resolve_path(data, dotted)
            except DlpipeError as exc:
                head = dotted.split(".")[0]
                choices = [k for k in TOP_LEVEL_KEYS if k != "stages"] + stage_ids(data)
                problem(
                    f"path {dotted!r} points nowhere: {head!r} is neither a top-level key "
                    "nor a stage name" if head not in choices else str(exc),
                    suggestions=close_matches(head, choices), available=choices,
                )
                continue
            if path[0] != "stages":
                if path[0] != "seed":
                    problem(f"path {dotted!r} cannot be searched", expected="a stage parameter or seed")
                continue
            target = by_index.get(int(path[1]))
            if int(path[1]) >= stage.index:
                problem(
                    f"path {dotted!r} points into stage {dotted.split('.')[0]!r}, which does "
                    f"not run before {stage.id!r}",
                    expected=f"a parameter of a stage listed before {stage.id!r}",
                )
                continue
            if target is None:
                continue  # that stage has problems of its own
            entry = registry.lookup_stage(target.kind, target.use)
            assert entry is not None
            rel = path[3:]
            if path[2] == "use":
                names = registry.stage_names(target.kind)
                for value in values:
                    if value not in names:
                        problem(f"path {dotted!r}: {value!r} is not a registered {target.kind}",
                                suggestions=close_matches(str(value), names), available=names)
                continue
            raw_stage = data["stages"][target.index]
            for value in values:
                raw_params = copy.deepcopy(raw_stage.get("params") or {})
                try:
                    set_path(raw_params, rel, value)
                    entry.params.model_validate(raw_params)
                except DlpipeError as exc:
                    problem(f"path {dotted!r}: {exc}")
                    break
                except ValidationError as exc:
                    first = pydantic_problems(exc, entry.params, (), YamlDocument(raw_params, {}, ""))[0]
                    bad = format_path(first.path)
                    problem(
                        f"path {dotted!r} with value {value!r}: {bad}: {first.message}",
                        expected=first.expected, suggestions=first.suggestions,
                        available=first.available,
                    )
                    break
            if (
                len(rel) == 2 and rel[0] == "loss_weights" and model_entry is not None
                and model_entry.loss_weights and rel[1] not in model_entry.loss_weights
            ):
                problem(
                    f"path {dotted!r}: model {model_entry.name!r} has no loss term {rel[1]!r}",
                    suggestions=close_matches(str(rel[1]), model_entry.loss_weights),
                    available=list(model_entry.loss_weights),
                )
    return problems


def _key_naming(doc: YamlDocument, index: int, dotted: str) -> KeyPath:
    """The key path, inside stage ``index``'s params, of the key spelled ``dotted``."""
    base = ("stages", index, "params")
    for path in doc.positions:
        if path[:3] == base and path and path[-1] == dotted:
            return path
    return base


def spec_plugins(doc: YamlDocument) -> list[str]:
    """The spec's ``plugins:`` list, read before validation (plugins add stages)."""
    data = doc.data
    if not isinstance(data, dict):
        return []
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise SpecError(
            doc.source,
            [Problem(("plugins",), "plugins must be a list of module names or .py paths",
                     doc.locate(("plugins",)), expected="a list of strings",
                     got=_describe(plugins))],
        )
    return plugins
