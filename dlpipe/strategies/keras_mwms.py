"""Two narrow patches that let Keras 3 ``fit``/``evaluate``/``predict`` run under
``tf.distribute.MultiWorkerMirroredStrategy`` (MWMS).

Upstream bug: https://github.com/keras-team/keras/issues/20585 (open; the TensorFlow
side, https://github.com/tensorflow/tensorflow/issues/72388, was closed without a
fix). With two workers, Keras 3 fails in two places of
``keras/src/backend/tensorflow/trainer.py``; each patch below replaces one of them
and changes nothing else:

1. :func:`_maybe_symbolic_build`: before the first step, Keras builds the model
   symbolically from one batch. It gets that batch by ``strategy.reduce("MEAN",
   batch, axis=None)`` on the whole ``(x, y[, w])`` tuple of per-replica values; MWMS
   rejects a nest (``PerReplica ... unsupported type``). Only the batch's shapes
   matter there, so the patch takes this worker's first local replica's part of the
   same batch (the shape a mean across replicas has) and hands it to the original as
   ``data_batch``. It draws the batch from the iterator exactly as Keras does, so the
   steps seen afterwards are the same as under ``MirroredStrategy``, and no collective
   op runs for it.
2. :func:`_reduce_per_replica`: after each step, the logs are reduced with
   ``reduction="auto"`` ("mean" off TPUs). On a multi-worker MWMS Keras calls
   ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalar logs (``Invalid
   reduction dimension 0``) and, for other ranks, would also average over the batch
   axis. The patch reduces with ``axis=None``: the element-wise mean across replicas,
   which is what Keras computes for every single-worker strategy
   (``tf.reduce_mean(local_results, axis=0)``). ``"concat"`` (``predict``), ``"sum"``
   and ``"first"`` go to Keras' own function unchanged.

Both patches only act when the model's strategy is an MWMS in multi-worker mode; any
other strategy goes straight to the original code. They are installed by
:func:`apply`, which only the ``multi_worker`` strategy calls, and only for the Keras
versions in :data:`TESTED_KERAS` (others raise a :class:`DlpipeError`). This is the
only dlpipe module that touches Keras internals.
"""

from __future__ import annotations

import os
from typing import Any

from dlpipe.errors import DlpipeError

#: Keras versions these patches were checked against (fit/evaluate/predict of compiled
#: and custom-train_step models, weights equal to MirroredStrategy's).
TESTED_KERAS = ("3.15.1",)
ISSUE = "https://github.com/keras-team/keras/issues/20585"
#: Set to 1 to apply the patches to an untested Keras version anyway.
UNTESTED_ENV = "DLPIPE_MWMS_UNTESTED_KERAS"

_applied = False


def check_version(version: str) -> None:
    """Raise a :class:`DlpipeError` unless ``version`` is one the patches were tested with."""
    if version in TESTED_KERAS or os.environ.get(UNTESTED_ENV) == "1":
        return
    raise DlpipeError(
        f"strategy multi_worker: Keras {version} is installed, but dlpipe's fix for "
        f"Keras' multi-worker training bug ({ISSUE}) was tested with Keras "
        f"{', '.join(TESTED_KERAS)} only. Install keras=={TESTED_KERAS[-1]}, check "
        f"whether that issue is fixed in your version, or set {UNTESTED_ENV}=1 to try "
        "the patches anyway."
    )


def apply() -> None:
    """Install both patches once per process (see the module docstring)."""
    global _applied
    if _applied:
        return
    import keras

    check_version(keras.__version__)
    from keras.src.backend.tensorflow import trainer

    missing = [name for name in ("reduce_per_replica", "_collective_all_reduce_multi_worker")
               if not callable(getattr(trainer, name, None))]
    if missing or not callable(getattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", None)):
        raise DlpipeError(
            f"strategy multi_worker: Keras {keras.__version__} no longer has the code "
            f"dlpipe patches for {ISSUE} ({', '.join(missing) or '_maybe_symbolic_build'})"
        )
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica
    is_multi_worker = trainer._collective_all_reduce_multi_worker

    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not is_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        def local(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        for _, _, it in iterator:  # as Keras does: one batch of the first epoch
            data_batch = keras.tree.map_structure(local, next(it))
            break
        return original_build(self, data_batch=data_batch)

    def _reduce_per_replica(values: Any, strategy: Any, reduction: Any) -> Any:
        import tensorflow as tf

        if reduction == "auto" and not isinstance(strategy, tf.distribute.TPUStrategy):
            reduction = "mean"
        if reduction != "mean" or not is_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)
        return keras.tree.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None), values)

    _maybe_symbolic_build.__doc__ = "dlpipe patch 1 (see dlpipe.strategies.keras_mwms)."
    _reduce_per_replica.__doc__ = "dlpipe patch 2 (see dlpipe.strategies.keras_mwms)."
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = _reduce_per_replica
    _applied = True
