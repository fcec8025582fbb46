"""MLflow tracking, as a plugin on the lifecycle hooks.

One MLflow run per pipeline run: the flattened resolved spec as params, every epoch's
metrics, tags with versions and the git commit, and every artifact a stage reports. A
failure marks the run FAILED with the error; an interrupt marks it KILLED.

MLflow runs in a sidecar process. Importing it, opening the store and every write
happen there, in order, on the machine's other core: the training process never imports
MLflow, never waits for the database, and exits without tearing MLflow down.
``after_run`` and ``on_run_error`` wait for the sidecar to finish, so nothing is lost.

The store must answer before the first stage starts (:data:`CONNECT_TIMEOUT_S`): a
tracking server that is down fails the run in seconds, before any training. A store
failure is reported as what it is (the server cannot be reached, no space left on the
device, the database file is unwritable or was removed), and a SQLite file that is
empty or not SQLite is refused: MLflow would silently start a new store over it.

A killed or failed run goes on in the same MLflow run when its spec runs again: the
run folder's ``tracking.json`` (:data:`RUN_FILE`) names the MLflow run until it has
finished, and the next top-level run of the spec reopens it (``dlpipe run --restart``
starts a new one).

The modules, by job:

=====================  ================================================================
:mod:`.plugin`         the hooks (registered as this package, ``dlpipe.tracking``)
:mod:`.run`            :class:`Tracker`, one tracked run; resuming it via ``tracking.json``
:mod:`.sidecar`        :func:`serve`, the tracking process, and :class:`Sidecar`, its queue
:mod:`.store`          store checks, MLflow's HTTP settings, what a store failure means
:mod:`.models`         staging, logging and registering the trained model
=====================  ================================================================

Importing this package imports neither MLflow nor TensorFlow.
"""

from dlpipe.tracking.models import log_model
from dlpipe.tracking.plugin import (
    after_run,
    before_run,
    before_stage,
    on_artifact,
    on_metrics,
    on_run_error,
)
from dlpipe.tracking.run import CONNECT_TIMEOUT_S, LOCAL_CONNECT_TIMEOUT_S, RUN_FILE, Tracker
from dlpipe.tracking.sidecar import Sidecar, serve
from dlpipe.tracking.store import StoreDamaged, check_store_file, describe_failure, failure_message

__all__ = [
    "CONNECT_TIMEOUT_S",
    "LOCAL_CONNECT_TIMEOUT_S",
    "RUN_FILE",
    "Sidecar",
    "StoreDamaged",
    "Tracker",
    "after_run",
    "before_run",
    "before_stage",
    "check_store_file",
    "describe_failure",
    "failure_message",
    "log_model",
    "on_artifact",
    "on_metrics",
    "on_run_error",
    "serve",
]
