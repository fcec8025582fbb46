"""One tracked run in the training process, and the same MLflow run resumed.

A killed or failed run goes on in the same MLflow run when its spec runs again: the
run folder's ``tracking.json`` (:data:`RUN_FILE`) names the MLflow run until it has
finished, and the next top-level run of the spec reopens it (``dlpipe run --restart``
starts a new one).
"""

from __future__ import annotations

import json
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.checkpoint import atomic_write_text
from dlpipe.errors import DlpipeError
from dlpipe.tracking.sidecar import Sidecar
from dlpipe.tracking.store import _check_store_file_now, _is_local

#: The run folder's record of its MLflow run (``{"uri", "run_id", "experiment"}``),
#: kept until the run has finished: a re-run of the spec continues that MLflow run.
RUN_FILE = "tracking.json"

#: Seconds from ``before_run`` within which a tracking server must have answered and
#: created the run; the first stage waits for it, so a server that is down fails the
#: run before any training.
CONNECT_TIMEOUT_S = 15.0

#: The same for a store on this machine (a SQLite file), which cannot be unreachable,
#: only slow: a new store's tables take seconds to create on a busy machine.
LOCAL_CONNECT_TIMEOUT_S = 120.0



def artifact_root_for(uri: str, artifact_location: str | None) -> str | None:
    """Where a new experiment's artifacts go: ``tracking.artifact_location`` when set;
    else ``None`` on a tracking server, which keeps them where it was told to
    (``--artifacts-destination``); else dlpipe's folder beside a local store."""
    if artifact_location:
        return artifact_location
    if uri.startswith(("http://", "https://")):
        return None
    return str(paths.default_artifact_root())

class Tracker:
    """One tracked run (``context.extras['mlflow']``): a top-level run owns the
    sidecar; a nested run (a tuning trial) shares its parent's."""

    def __init__(
        self, context: Any, parent: Tracker | None = None, spec_files: tuple[str, ...] = ()
    ) -> None:
        from dlpipe.spec import flatten_params

        settings = context.spec.settings.tracking
        self.context = context
        self.parent = parent
        self.sidecar: Sidecar
        if parent is not None:
            self.sidecar = parent.sidecar
        else:
            uri = paths.absolute_sqlite(settings.uri) if settings.uri else paths.default_tracking_uri()
            _check_store_file_now(uri)
            self.sidecar = Sidecar(uri)
        self.uri = self.sidecar.uri
        self.key = self.sidecar.new_key()
        #: The store has answered and the run exists (checked before the first stage).
        self.confirmed = False
        self.attached = parent is None and settings.attach_run_id is not None
        if self.attached:
            self.sidecar.send("attach", self.key, settings.attach_run_id)
            return
        artifact_root = artifact_root_for(self.uri, settings.artifact_location)
        resume_id = self._unfinished_run() if parent is None else None
        if parent is None:
            self.sidecar.announce[self.key] = self._announce
        self.send(
            "start",
            parent.key if parent else None,
            context.spec.experiment,
            artifact_root,
            context.run_name or settings.run_name or context.spec.name,
            _tags(context) | dict(settings.tags) | dict(context.tags),
            flatten_params(context.spec),
            resume_id,
            list(spec_files),
        )

    def _announce(self, run_id: str, resumed: int) -> None:
        where = f"in experiment {self.context.spec.experiment!r} ({self.uri})"
        if resumed:
            print(f"mlflow: resuming run {run_id} {where} (resume {resumed})", flush=True)
        else:
            print(f"mlflow: tracking run {run_id} {where}", flush=True)

    @property
    def run_file(self) -> Path:
        return Path(self.context.run_dir) / RUN_FILE

    def _unfinished_run(self) -> str | None:
        """The MLflow run of an earlier, unfinished run of this spec, to go on with."""
        path = self.run_file
        if self.context.restart:
            path.unlink(missing_ok=True)
            return None
        try:
            record = json.loads(path.read_text())
            run_id, uri = str(record["run_id"]), str(record["uri"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            print(f"mlflow: ignoring {path} (unreadable); tracking a new run", flush=True)
            return None
        if uri != self.uri:
            print(f"mlflow: the unfinished run {run_id} of this spec is in another store "
                  f"({uri}); tracking a new run in {self.uri}", flush=True)
            return None
        return run_id

    def remember(self) -> None:
        """Name the run in the run folder, so that a re-run goes on with it."""
        run_id = self.run_id
        if run_id is None or self.parent is not None or self.attached:
            return
        record = {"uri": self.uri, "run_id": run_id, "experiment": self.context.spec.experiment}
        try:
            atomic_write_text(self.run_file, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            print(f"mlflow: could not write {self.run_file} ({exc.strerror}); a re-run "
                  "will track a new run", flush=True)

    def forget(self) -> None:
        """The run has finished: the next run of the spec is a new MLflow run."""
        try:
            record = json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(record, dict) and record.get("run_id") == self.run_id:
            self.run_file.unlink(missing_ok=True)

    @property
    def run_id(self) -> str | None:
        self.sidecar.read_replies()
        run_id = self.sidecar.run_ids.get(self.key)
        if run_id is not None and self.context.run_id is None:
            self.context.run_id = run_id
        return run_id

    def send(self, op: str, *args: Any) -> None:
        self.sidecar.send(op, self.key, *args)

    def raise_if_failed(self) -> None:
        self.sidecar.raise_if_failed()

    def wait_for_run_id(self, timeout: float = 120) -> str:
        """Block until the run exists (for plugins that need the id mid-run)."""
        deadline = time.monotonic() + timeout
        while self.run_id is None and time.monotonic() < deadline:
            self.raise_if_failed()
            time.sleep(0.05)
        run_id = self.run_id
        if run_id is None:
            raise DlpipeError(f"MLflow tracking ({self.uri}) did not create the run in {timeout} s")
        return run_id

    def confirm(self) -> None:
        """Wait until the store has answered and the run exists, at most until
        :data:`CONNECT_TIMEOUT_S` after ``before_run``; then name the run in the run
        folder. Raises :class:`DlpipeError` when the store failed or did not answer."""
        limit = LOCAL_CONNECT_TIMEOUT_S if _is_local(self.uri) else CONNECT_TIMEOUT_S
        deadline = self.sidecar.started_at + limit
        while self.run_id is None:
            self.raise_if_failed()
            if time.monotonic() >= deadline:
                kind = "store" if _is_local(self.uri) else "connect"
                self.sidecar.abandon(kind, f"no answer from the tracking store in {limit:.0f} s")
                self.raise_if_failed()
            time.sleep(0.05)
        self.confirmed = True
        self.remember()

    def finish(
        self, status: str, error: str | None = None, timeout: float = 120, check: bool = True
    ) -> None:
        """Close the run; a top-level run also waits for every queued write (at most
        ``timeout`` s). Raises a tracking failure not raised yet, unless ``check`` is
        false (the run failed already: :meth:`report_end` tells of the store's failure)."""
        self.sidecar.send("finish", self.key, status, error, dict(self.context.tags), check=check)
        if self.parent is None:
            self.sidecar.stop(timeout, check=check)

    def report_end(self, status: str, message: str | None) -> None:
        """Print what became of the run in the store, as far as it is known."""
        sidecar = self.sidecar
        if sidecar.failure is not None and not sidecar.failure_raised:
            sidecar.failure_raised = True  # printed here, not raised: another error wins
            print(f"mlflow: {sidecar.failure_message()}", flush=True)
        run_id, recorded = self.run_id, sidecar.finished.get(self.key)
        store_error = sidecar.failure[1] if sidecar.failure else "the tracking store did not answer"
        if sidecar.failure is not None and status != "KILLED":
            status = "FAILED"  # what the sidecar marks a run whose tracking failed
        where = f"in experiment {self.context.spec.experiment!r} ({self.uri})"
        if run_id is None:
            print(f"mlflow: the run was not recorded: {store_error}", flush=True)
        elif sidecar.failure is not None and sidecar.failure[0] == "removed":
            print(f"mlflow: run {run_id} was not recorded: {store_error}", flush=True)
        elif recorded is None:
            print(f"mlflow: run {run_id} could not be marked {status} in the store "
                  f"({store_error}); it may still show as RUNNING", flush=True)
        elif recorded == "FINISHED":
            print(f"mlflow: run {run_id} FINISHED {where}; browse it with `dlpipe ui`")
        elif sidecar.failure is not None:
            print(f"mlflow: run {run_id} {recorded} {where}: MLflow tracking failed: "
                  f"{store_error}", flush=True)
        else:
            print(f"mlflow: run {run_id} {recorded}: {message}", flush=True)


def _tags(context: Any) -> dict[str, str]:
    spec = context.spec
    tags = {
        "dlpipe.spec_file": spec.source,
        "dlpipe.spec_digest": spec.digest(),
        "dlpipe.run_dir": str(context.run_dir),
        "mlflow.source.name": spec.source,
    }
    if spec.overrides:
        tags["dlpipe.overrides"] = " ".join(spec.overrides)
    for dist in ("dlpipe", "tensorflow", "keras", "mlflow", "optuna"):
        try:
            tags[f"version.{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    for info in context.plugins.plugins:
        tags[f"plugin.{info.name}"] = f"{info.version or '-'} ({info.source})"
    commit = _git_commit(Path(spec.source).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

