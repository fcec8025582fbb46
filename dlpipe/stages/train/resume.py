"""Resuming ``keras_fit`` from dlpipe's own snapshots (:mod:`dlpipe.checkpoint`): the
stage's backup folder, the callback that writes snapshots, and putting one back."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import keras

from dlpipe.checkpoint import BackupFolder, Snapshot, read_model_state, write_model_state
from dlpipe.errors import DlpipeError
from dlpipe.strategies import multi_worker

if TYPE_CHECKING:
    from dlpipe.stages.train.callbacks import Callbacks, LossGuard


class Resumable:
    """A callback whose state a resume snapshot keeps (see :class:`ResumeCheckpoint`).

    ``resume_state`` returns JSON data; ``write_resume_files(folder)`` may add files
    (named after :attr:`resume_name`); ``restore(state, folder)`` puts both back,
    before training resumes. Restored callbacks must not reset in ``on_train_begin``.
    """

    resume_name = "callback"

    def resume_state(self) -> dict[str, Any]:
        return {}

    def write_resume_files(self, folder: Any) -> None:
        pass

    def restore(self, state: dict[str, Any], folder: Any) -> None:
        pass


class ResumeCheckpoint(keras.callbacks.Callback):
    """Write resume snapshots (:mod:`dlpipe.checkpoint`) at most every
    ``every_seconds`` at the end of an epoch, and restore one in ``on_train_begin``.

    A snapshot holds everything ``fit`` had at the end of an epoch: the weights and the
    optimizers' state (its iteration count drives learning-rate schedules), the random
    generators, the epoch, the history so far and the state of every
    :class:`Resumable` callback (best-so-far, best weights, early-stopping patience).
    It comes after those callbacks in the list, so it saves what they made of the
    epoch; they do not reset in ``on_train_begin``, so restoring there is in time.
    """

    def __init__(self, backup: BackupFolder, every_seconds: float, epochs: int,
                 history: dict[str, list[float]], resumables: list[Any],
                 snapshot: Snapshot | None, guard: LossGuard | None = None) -> None:
        super().__init__()
        self.guard = guard
        self.backup = backup
        self.every_seconds = every_seconds
        self.epochs = epochs
        self.history = history
        self.resumables = resumables
        self.snapshot = snapshot
        self.epoch = snapshot.epoch if snapshot else 0
        self.saved_epoch = self.epoch
        self._last_save = time.monotonic()

    def on_train_begin(self, logs: Any = None) -> None:
        if self.snapshot is not None:
            restore_snapshot(self.model, self.snapshot, self.resumables, self.history)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.guard is not None and self.guard.bad is not None:
            return  # never save weights that diverged
        self.epoch = epoch + 1
        if self.model.stop_training:
            # Early stopping may have put the best weights back; training ends here
            # and the final snapshot follows. A kill before it replays this epoch.
            return
        if self._due():
            self.save()

    def _due(self) -> bool:
        """Whether to save now: ``every_seconds`` have passed. Under a multi-worker
        strategy the chief's clock decides for every worker, so that all of them
        write the same snapshots (:func:`open_backup`)."""
        due = time.monotonic() - self._last_save >= self.every_seconds
        strategy = getattr(self.model, "distribute_strategy", None)
        if self.every_seconds <= 0 or multi_worker.worker_of(strategy) is None:
            return due
        return bool(multi_worker.chief_value(strategy, int(due)))

    def save(self, done: bool = False) -> None:
        state = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "done": done,
            "history": self.history,
            "callbacks": {cb.resume_name: cb.resume_state() for cb in self.resumables},
        }

        def write(folder: Any) -> None:
            write_model_state(self.model, folder)
            for cb in self.resumables:
                cb.write_resume_files(folder)

        self.backup.save(state, write)
        self.saved_epoch = self.epoch
        self._last_save = time.monotonic()


def _build_optimizers(model: Any) -> None:
    """Create optimizer variables so ``load_weights`` has somewhere to put them
    (``fit`` builds them itself before ``on_train_begin``)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def restore_snapshot(model: Any, snapshot: Snapshot, resumables: list[Any],
                     history: dict[str, list[float]]) -> None:
    _build_optimizers(model)
    read_model_state(model, snapshot)
    states = snapshot.state.get("callbacks") or {}
    for cb in resumables:
        cb.restore(states.get(cb.resume_name) or {}, snapshot.folder)
    history.clear()
    for key, values in (snapshot.state.get("history") or {}).items():
        history[key] = list(values)[: snapshot.epoch]


@dataclasses.dataclass
class Resume:
    """One train stage's resume backup and the snapshot training starts from.

    ``enabled`` unless the spec turns ``resume`` off or the run is a ``--smoke`` test;
    ``snapshot`` is the newest good one in ``backup``, ``None`` to start afresh.
    """

    backup: BackupFolder
    enabled: bool
    snapshot: Snapshot | None = None

    @property
    def finished(self) -> bool:
        """Training finished in an earlier run that was stopped later (in evaluation,
        say)."""
        return self.snapshot is not None and self.snapshot.done


class ScratchBackup(BackupFolder):
    """Where a worker that is not the chief writes its snapshots: each one is deleted
    as soon as it is whole. Writing them keeps every worker in step with the chief's
    (TensorFlow's multi-worker checkpointing has every worker save, the others to a
    temporary folder); resuming reads the chief's backup."""

    def save(self, state: dict[str, Any], write_files: Any) -> Snapshot:
        snapshot = super().save(state, write_files)
        self.discard()
        return snapshot


def open_backup(ctx: Any, params: Any, tag: str) -> Resume:
    """The backup folder of the stage (``tag``: see :func:`~.fit.stage_prefix`) and,
    when resuming, its newest snapshot; ``--restart`` sets the earlier one aside.

    Under a multi-worker strategy every worker resumes from the chief's backup: the
    chief opens it as above and tells the others which snapshot it took (a collective
    op); they verify that snapshot and write their own to a :class:`ScratchBackup`.
    """
    name = "backup" if not tag else f"backup-{tag}"
    backup = BackupFolder(ctx.run_dir / name)
    resume = Resume(backup, bool(params.resume and not ctx.smoke))
    if not resume.enabled:
        return resume
    worker = multi_worker.worker_of(getattr(ctx, "strategy", None))
    if worker is not None:
        return _open_shared_backup(ctx, params, resume, name, worker)
    _load_snapshot(ctx, params, resume)
    return resume


def _load_snapshot(ctx: Any, params: Any, resume: Resume) -> None:
    if ctx.restart:
        aside = resume.backup.set_aside("restarted")
        if aside is not None:
            print(f"train: --restart: the earlier backup is kept aside in {aside}")
    resume.snapshot = resume.backup.load(params.epochs, older=ctx.resume_older)


def _open_shared_backup(ctx: Any, params: Any, resume: Resume, name: str,
                        worker: tuple[int, int]) -> Resume:
    """:func:`open_backup` on a worker of a multi-worker cluster (see there)."""
    number, size = worker
    if number == 0:
        try:
            _load_snapshot(ctx, params, resume)
        except BaseException:
            with contextlib.suppress(Exception):  # the others must not wait for it
                multi_worker.chief_value(ctx.strategy, -1)
            raise
        seq = int(resume.snapshot.folder.name.split("-")[1]) if resume.snapshot else 0
        multi_worker.chief_value(ctx.strategy, seq)
        return resume
    seq = multi_worker.chief_value(ctx.strategy, 0)
    if seq < 0:
        raise DlpipeError(f"worker {number} of {size}: the chief could not open the resume "
                          "backup (see its error); stopping too")
    resume.backup = ScratchBackup(ctx.run_dir / name)
    if seq > 0:
        assert ctx.chief_run_dir is not None, "the engine sets it on every other worker"
        shared = BackupFolder(ctx.chief_run_dir / name)
        folder = shared.folder / f"ckpt-{seq:06d}"
        try:
            resume.snapshot = shared.verify(folder, params.epochs)
        except (ValueError, OSError) as exc:
            raise DlpipeError(
                f"worker {number} of {size}: cannot read the chief's resume snapshot "
                f"{folder} ({exc}). Every worker resumes from the chief's backup, so the "
                "run folder (DLPIPE_HOME) must be on storage all workers share."
            ) from None
    return resume


def reuse_finished(ctx: Any, model: Any, resume: Resume, callbacks: Callbacks) -> None:
    """Put the final state of a run that finished training into ``model`` and the
    callbacks, instead of training again."""
    snapshot = resume.snapshot
    assert snapshot is not None
    with ctx.strategy.scope():  # optimizer variables are made under the strategy
        restore_snapshot(model, snapshot, callbacks.resumables, callbacks.history)
    print(f"train: training finished in an earlier run ({snapshot.epoch} epochs; "
          f"{snapshot.folder}); using its weights, not training again")
