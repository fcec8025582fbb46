"""The training stage: ``model.fit`` driven by the spec.

:func:`keras_fit` is the stage, step by step; the steps live by job in this package:

* :mod:`.balance`: ``oversample`` and ``class_weight`` (:func:`balanced_training_data`);
* :mod:`.compile`: loss (a Keras name, or :func:`dlpipe.losses.make_loss`), metrics,
  optimizer and schedule, ``loss_weights``;
* :mod:`.regularization`: L1/L2 penalties on layer groups (:func:`apply_regularization`);
* :mod:`.callbacks`: per-epoch metrics for the ``on_metrics`` hook (MLflow logs them;
  nothing runs per batch except Keras itself), the loss guard, best weights, early
  stopping, and the order of all callbacks;
* :mod:`.resume`: resuming from dlpipe's own snapshots (:mod:`dlpipe.checkpoint`).

Each option is described in ``docs/training.md``. The names other code imports from
here are re-exported.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from dlpipe.checkpoint import atomic_write
from dlpipe.errors import DlpipeError, TrainingDiverged
from dlpipe.stages.train.balance import balanced_training_data, oversample_indices
from dlpipe.stages.train.callbacks import (
    BestTracker,
    BestWeights,
    Callbacks,
    EarlyStop,
    LossGuard,
    ReportEpochs,
    build_callbacks,
    chance_loss,
    current_learning_rate,
    guard_message,
    restore_best_weights,
)
from dlpipe.stages.train.compile import (
    WarmUp,
    apply_loss_weights,
    choose_loss,
    compile_model,
    default_loss,
    learning_rate,
    make_optimizer,
    steps_per_epoch,
)
from dlpipe.stages.train.regularization import all_layers, apply_regularization, regularize
from dlpipe.stages.train.resume import (
    Resumable,
    Resume,
    ResumeCheckpoint,
    open_backup,
    restore_snapshot,
    reuse_finished,
)

__all__ = [
    "BestTracker", "BestWeights", "EarlyStop", "LossGuard", "ReportEpochs", "Resumable",
    "ResumeCheckpoint", "WarmUp", "all_layers", "apply_regularization",
    "balanced_training_data", "chance_loss", "current_learning_rate", "default_loss",
    "keras_fit", "learning_rate", "make_optimizer", "oversample_indices",
    "restore_best_weights", "restore_snapshot", "stage_prefix",
]


def keras_fit(ctx: Any, params: Any) -> None:
    """Train the model of the stages before on their data, as ``params`` say; save it.

    The steps, in the order they must run:

    1. rebalance the training split (``oversample``, ``class_weight``);
    2. choose the loss and metrics (checked before any layer changes), add
       ``regularization``, compile;
    3. set ``loss_weights`` on the model's loss terms. This comes before the callbacks
       are built: the model's own callbacks read the weights they start from (the
       VAE's KL warm-up ramps the ``kl`` term up to the weight set here);
    4. open the resume backup, then build the callbacks (the resume checkpoint writes
       to that backup; the model's own callbacks come last);
    5. train, or take the final weights of an earlier run that finished training;
    6. put the best weights back (``restore_best``), write the final snapshot, save
       (on the chief only, under a multi-worker strategy; every worker takes part in
       the snapshots, see :func:`~.resume.open_backup`).
    """
    model, data, task = _inputs(ctx)
    data = balanced_training_data(data, params, ctx.seed)
    loss = choose_loss(ctx, params, model, data, task)
    regularize(params, model, loss.own)
    compile_model(ctx, params, model, loss, steps_per_epoch(data, params))
    apply_loss_weights(ctx, params, model, loss)
    prefix = stage_prefix(ctx)
    resume = open_backup(ctx, params, prefix.rstrip("/"))
    callbacks = build_callbacks(ctx, params, model, data, task, loss, resume, prefix)
    if resume.finished:
        reuse_finished(ctx, model, resume, callbacks)
    else:
        _train(ctx, params, model, data, callbacks, resume)
    if params.restore_best:  # a reused run has the same weights; this logs best_epoch again
        restore_best_weights(ctx, model, callbacks.best)
    if resume.enabled and not resume.finished:
        # Training is done: a kill in a later stage must not cost it. The backup is
        # removed once the whole run has finished.
        callbacks.checkpoint.save(done=True)
    ctx.history = callbacks.history
    if resume.enabled:
        ctx.discard_on_success.append(resume.backup.folder)
    if params.save_model and ctx.is_chief:  # other workers hold the same weights
        save_model(ctx, model, prefix)


def _inputs(ctx: Any) -> tuple[Any, Any, str]:
    """The model and data the stages before made, and the model's task."""
    model, data = ctx.model, ctx.data
    if model is None or data is None:
        raise DlpipeError(
            f"stage {ctx.stage.id!r}: training needs a data stage and a model stage before it"
        )
    entry = ctx.model_entry()
    return model, data, entry.task if entry else data.task


def stage_prefix(ctx: Any) -> str:
    """``"<stage id>/"`` when the spec has several train stages, else ``""``.

    Two train stages in one run (an autoencoder, then latent diffusion on it) would
    otherwise log the same metric names and files into one MLflow run: their epoch
    metrics become ``train_vae/loss``, ``train_diffusion/loss`` (grouped in the
    MLflow UI), and checkpoints and saved models get the stage id in their names.
    """
    trains = [s for s in ctx.spec.stages if s.kind == ctx.stage.kind]
    return f"{ctx.stage.id}/" if len(trains) > 1 else ""


def _train(ctx: Any, params: Any, model: Any, data: Any, callbacks: Callbacks,
           resume: Resume) -> None:
    """``fit`` from the resume snapshot's epoch (or the first); raises
    :class:`TrainingDiverged` when the loss guard stopped it."""
    if resume.snapshot is not None:
        print(f"train: resuming from {resume.snapshot.folder} after epoch "
              f"{resume.snapshot.epoch} of {params.epochs}")
    _fit(ctx, params, model, data, callbacks.all, data.size("val") > 0,
         steps_per_epoch(data, params), callbacks.checkpoint.epoch)
    if callbacks.guard.bad is not None:
        raise TrainingDiverged(guard_message(ctx, callbacks.guard, resume.backup))


def _fit(ctx: Any, params: Any, model: Any, data: Any, callbacks: list[Any], has_val: bool,
         steps_per_epoch: int, initial_epoch: int) -> None:
    verbose = params.verbose
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    epochs = 1 if ctx.smoke else params.epochs
    # One pass per epoch in a fixed order per (seed, epoch), so a resumed run sees
    # the same batches as an uninterrupted one.
    train_ds = data.epoch_dataset(
        "train", params.batch_size, first_epoch=initial_epoch, epochs=epochs,
        shuffle=params.shuffle, seed=ctx.seed, augment=True,
    )
    val_ds = data.dataset("val", params.batch_size) if has_val else None
    # TensorFlow and Keras leave ~500k long-lived objects; move them out of the cyclic
    # collector's sight so full collections during training (and at exit) stay cheap.
    gc.collect()
    gc.freeze()
    # --smoke: one epoch of a few batches exercises every callback and the save.
    smoke = {"steps_per_epoch": min(3, steps_per_epoch),
             "validation_steps": 2 if val_ds is not None else None} if ctx.smoke else {}
    model.fit(
        train_ds,
        validation_data=val_ds,
        initial_epoch=initial_epoch,
        epochs=epochs,
        steps_per_epoch=smoke.pop("steps_per_epoch", steps_per_epoch),
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the dataset is already in its per-epoch order
        **smoke,
    )


def save_model(ctx: Any, model: Any, prefix: str) -> None:
    """Save ``model`` atomically under ``model/`` and log it: ``model.keras`` for the
    last train stage, ``<stage id>.keras`` for the ones before it."""
    model_dir = ctx.run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    last = [s for s in ctx.spec.stages if s.kind == ctx.stage.kind][-1]
    path = model_dir / ("model.keras" if last.id == ctx.stage.id else f"{prefix.rstrip('/')}.keras")
    atomic_write(path, lambda tmp: model.save(tmp))
    ctx.log_artifact(path, "model")
