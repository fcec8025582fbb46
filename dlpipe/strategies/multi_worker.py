"""``strategy: multi_worker``: synchronous data parallelism over several processes
(``tf.distribute.MultiWorkerMirroredStrategy``), on one host or many.

Every worker runs the same spec. The cluster comes from the spec's
``strategy.params`` (``workers``: every worker's ``host:port``, the chief first;
``index``: this process's place in that list) or, when those are not set, from
``TF_CONFIG``, as TensorFlow defines it (a ``chief`` job is allowed; ``ps`` and
``evaluator`` tasks are not). ``dlpipe run SPEC --local-workers N``
(:mod:`dlpipe.strategies.launch`) starts N workers on this host with their
``TF_CONFIG``.

What the rest of dlpipe does with the cluster:

* the chief (the ``chief`` task, else worker 0) is the only one that tracks the run
  in MLflow, logs figures and artifacts and saves the model
  (:attr:`dlpipe.context.RunContext.is_chief`);
* the other workers run in a folder of their own inside the chief's run folder,
  ``workers/worker-<i>/`` (:func:`worker_name`), so they never write the chief's files;
* every worker writes each resume snapshot at the same epoch (the chief's clock
  decides, :func:`chief_value`); the others write theirs to their own folder and
  delete it again, and a re-launch resumes every worker from the chief's snapshot,
  so the run folder must be on storage all workers share (one host: always);
* a worker that dies makes the collective ops of the others fail (TensorFlow's
  coordination service notices the missing heartbeats within seconds, and
  ``timeout_seconds`` bounds a collective that waits on a hung worker): they stop with
  :class:`WorkerLost` instead of hanging.

TensorFlow is imported inside the functions: the engine asks :func:`worker_name`
before TensorFlow loads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from dlpipe.errors import DlpipeError

HOW = ("set TF_CONFIG, set strategy.params.workers and strategy.params.index, or start "
       "the workers with `dlpipe run SPEC --local-workers N`")


class WorkerLost(DlpipeError):
    """Another worker of the cluster stopped answering (it died or hung)."""

    exit_code = 1


@dataclass(frozen=True)
class Cluster:
    """The cluster and this process's task in it (read without TensorFlow)."""

    jobs: dict[str, list[str]]
    task_type: str
    task_index: int
    source: str

    @property
    def size(self) -> int:
        return sum(len(tasks) for tasks in self.jobs.values())

    @property
    def is_chief(self) -> bool:
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_index == 0

    @property
    def worker_name(self) -> str | None:
        """``None`` for the chief, else ``worker-<i>`` (``chief`` jobs shift nothing:
        the name is the task's own)."""
        return None if self.is_chief else f"{self.task_type}-{self.task_index}"


def cluster_from(params: Any) -> Cluster:
    """This process's cluster: ``params.workers``/``params.index``, else ``TF_CONFIG``."""
    if params.workers:
        if params.index is None:
            raise DlpipeError("strategy.params.workers is set, so strategy.params.index "
                              "must say which of them this process is")
        return _checked({"worker": list(params.workers)}, "worker", params.index,
                        "strategy.params")
    if params.index is not None:
        raise DlpipeError("strategy.params.index is set without strategy.params.workers")
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise DlpipeError(f"strategy multi_worker: no cluster is configured; {HOW}")
    try:
        config = json.loads(raw)
        jobs = {str(k): [str(a) for a in v] for k, v in config["cluster"].items()}
        task = config["task"]
        return _checked(jobs, str(task["type"]), int(task["index"]), "TF_CONFIG")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DlpipeError(
            f"TF_CONFIG is not a valid cluster ({type(exc).__name__}: {exc}); expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            '"index": 0}}'
        ) from None


def _checked(jobs: dict[str, list[str]], task_type: str, index: int, source: str) -> Cluster:
    other = sorted(set(jobs) - {"chief", "worker"})
    if other:
        raise DlpipeError(f"strategy multi_worker runs chief and worker tasks only; {source} "
                          f"also has {', '.join(other)}")
    if task_type not in jobs:
        raise DlpipeError(f"{source}: this task is a {task_type!r}, a job the cluster lacks")
    if not 0 <= index < len(jobs[task_type]):
        raise DlpipeError(f"{source}: task index {index} is outside the "
                          f"{len(jobs[task_type])} {task_type} addresses")
    if len(jobs.get("chief", [])) > 1:
        raise DlpipeError(f"{source}: a cluster has at most one chief")
    return Cluster(jobs, task_type, index, source)


def worker_name(params: Any) -> str | None:
    return cluster_from(params).worker_name


def multi_worker(params: Any) -> Any:
    """The strategy factory: patch Keras (:mod:`.keras_mwms`), then join the cluster
    (this blocks until every worker has started)."""
    cluster = cluster_from(params)
    from dlpipe.strategies import keras_mwms

    keras_mwms.apply()
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster.jobs),
        task_type=cluster.task_type,
        task_id=cluster.task_index,
        num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))},
        rpc_layer="grpc",
    )
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=params.timeout_seconds
    )
    role = "chief" if cluster.is_chief else cluster.worker_name
    print(f"strategy: multi_worker, {role} of {cluster.size} workers ({cluster.source}); "
          "waiting for the others", flush=True)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )
    print(f"strategy: multi_worker over {cluster.size} workers, "
          f"{strategy.num_replicas_in_sync} replicas", flush=True)
    return strategy


# --------------------------------------------------------------------------------------
# For the stages and the engine
# --------------------------------------------------------------------------------------


def worker_of(strategy: Any) -> tuple[int, int] | None:
    """``(this worker's number, number of workers)`` under a multi-worker MWMS, the
    chief being 0; ``None`` for any other strategy (one process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    workers = len(jobs.get("worker", []))
    if chiefs + workers < 2:
        return None
    number = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id or 0)
    return number, chiefs + workers


def chief_value(strategy: Any, value: int) -> int:
    """The chief's ``value`` on every worker. A collective op: every worker must call
    it at the same point, with any ``value`` (only the chief's counts)."""
    import tensorflow as tf

    worker = worker_of(strategy)
    if worker is None:
        return value
    mine = value if worker[0] == 0 else 0
    local = len(strategy.extended.worker_devices)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda _: tf.constant(mine, tf.int64)
    )
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return int(total.numpy()) // local


def explain_failure(strategy: Any, error: BaseException) -> WorkerLost | None:
    """A :class:`WorkerLost` for the error a collective op raises when another worker
    died or hung; ``None`` for any other error."""
    worker = worker_of(strategy)
    if worker is None:
        return None
    import tensorflow as tf

    lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.AbortedError)
    if not isinstance(error, lost):
        return None
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(error))
    reason = " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())
    number, size = worker
    return WorkerLost(
        f"worker {number} of {size}: lost contact with the other workers, so it "
        f"stopped ({type(error).__name__}: {reason[:300]}). Another worker "
        "died or hung: see its output. Re-run the same command on every worker to "
        "resume from the last backup."
    )
