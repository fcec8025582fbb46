"""User-facing errors.

Anything a user can cause (a broken spec, an unknown plugin, a missing file) is raised
as a :class:`DlpipeError`. The CLI prints it without a traceback and exits with
status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

KeyPath = tuple[str | int, ...]


class DlpipeError(Exception):
    """An error caused by the user's input; reported without a traceback."""

    exit_code = 2


class ConfigError(DlpipeError, ValueError):
    """A setting the spec's data or model cannot support: an image side that does not
    divide, missing class labels, a loss weight for a term the model lacks. Raised
    while building a model; also a ``ValueError``, as Python code expects of a bad
    argument value."""


class PluginError(DlpipeError):
    """A plugin could not be loaded or registered something invalid."""


class TrainingDiverged(DlpipeError):
    """A watched loss became NaN or infinite during training."""

    exit_code = 1


class RunStopped(Exception):
    """Raised by a plugin to end a nested run early on purpose, such as a tuning trial
    that a pruner stopped. It is not a failure: tracking closes the run as FINISHED
    and tags it with :attr:`state`.
    """

    def __init__(self, message: str, state: str = "PRUNED") -> None:
        super().__init__(message)
        self.state = state


def format_path(path: KeyPath) -> str:
    """Render a key path as ``stages[2].params.epochs``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names from ``choices`` that look like ``word`` (a typo, a different case)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]


@dataclass
class Location:
    """Where a value came from: a file and line, or the command line."""

    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column or 1}"


@dataclass
class Problem:
    """One thing wrong with a spec."""

    path: KeyPath
    message: str
    location: Location | None = None
    expected: str | None = None
    got: str | None = None
    suggestions: Sequence[str] = field(default_factory=list)
    available: Sequence[str] = field(default_factory=list)
    label: str | None = None  # e.g. the stage name, shown next to the path

    def render(self) -> str:
        where = f"{self.location}: " if self.location else ""
        label = f" ({self.label})" if self.label else ""
        lines = [f"{where}{format_path(self.path)}{label}: {self.message}"]
        if self.expected is not None:
            lines.append(f"    expected: {self.expected}")
        if self.got is not None:
            lines.append(f"    got:      {self.got}")
        if self.suggestions:
            lines.append(f"    did you mean: {', '.join(self.suggestions)}?")
        if self.available:
            lines.append(f"    available: {', '.join(self.available)}")
        return "\n".join(lines)


class SpecError(DlpipeError):
    """A pipeline spec is invalid. Holds every problem found, not just the first."""

    #: At most this many problems are printed; the rest are counted.
    shown = 100

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''} in the pipeline spec"
        lines = [head, *(p.render() for p in self.problems[: self.shown])]
        if n > self.shown:
            lines.append(f"... and {n - self.shown} more problems, not shown")
        return "\n".join(lines)
