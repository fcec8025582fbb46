"""Counting a study's trials, under a lock, so that workers share the budget exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState


@dataclass
class Tally:
    counted: int = 0
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: set[int] = field(default_factory=set)


def tally(trials: list[Any]) -> Tally:
    """Count the study's trials. A failed trial that was retried (its worker died) or
    that Ctrl+C interrupted does not use up the budget; its retry does."""
    t = Tally()
    for trial in trials:
        t.retried.update(trial.system_attrs.get("retry_history", []))
    for trial in trials:
        if trial.state == TrialState.FAIL and (
            trial.number in t.retried or trial.user_attrs.get("dlpipe.interrupted")
        ):
            continue
        t.counted += 1
        if trial.state == TrialState.WAITING:
            t.waiting += 1
        elif trial.state == TrialState.RUNNING:
            t.running += 1
        elif trial.state == TrialState.COMPLETE:
            t.complete += 1
        elif trial.state == TrialState.PRUNED:
            t.pruned += 1
        elif trial.state == TrialState.FAIL:
            t.failed += 1
    return t


class StudyLock:
    """An exclusive file lock beside a SQLite study, held from "is a trial still
    needed?" until that trial exists. Server databases are shared across machines; for
    them this lock is local only, and concurrent starts may overshoot by a trial."""

    def __init__(self, url: str) -> None:
        self._handle: Any = None
        self.path: Path | None = None
        if url.startswith("sqlite:///"):
            self.path = Path(url[len("sqlite:///"):] + ".lock")

    def acquire(self) -> None:
        if self.path is None or self._handle is not None:
            return
        import fcntl

        self._handle = open(self.path, "w")  # noqa: SIM115 - held across calls
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
