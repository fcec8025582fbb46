"""Reading spec YAML safely, keeping the file position of every key.

Loading is safe and bounded, so that validation answers any input with a message and
never with a crash or a hang: only plain YAML values (a date stays text), at most
:data:`MAX_DEPTH` levels of nesting and :data:`MAX_VALUES` values with aliases
expanded, UTF-8 files of at most :data:`MAX_BYTES` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlpipe.errors import DlpipeError, KeyPath, Location, Problem, SpecError, close_matches

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
#: Integers longer than this are refused (Python cannot even print 4300 digits).
MAX_DIGITS = 300


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


def parse_yaml(text: str, source: str) -> YamlDocument | None:
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
    doc = parse_yaml(text, source)
    if doc is None:
        raise SpecError(source, [Problem((), "the file is empty", Location(source, 1, 1))])
    return doc


def read_spec_file(path: str | Path) -> YamlDocument:
    """Read and load a spec file: UTF-8, at most :data:`MAX_BYTES` bytes; a missing file
    is reported with the specs next to where it was looked for."""
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
