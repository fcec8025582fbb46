"""``strategy: tpu``: a Cloud TPU through ``tf.distribute.TPUStrategy``.

The TPU is brought up in the order TensorFlow requires (the same order as the
TensorFlow Model Garden's ``tpu_initialize``):

1. ``TPUClusterResolver(tpu=..., zone=..., project=...)`` finds the TPU;
2. ``tf.config.experimental_connect_to_cluster`` connects this process to it (not for
   ``tpu: local``, whose TPU is attached to this very machine);
3. ``tf.tpu.experimental.initialize_tpu_system`` initialises it (once per process, and
   before any other TensorFlow work touches a device);
4. ``tf.distribute.TPUStrategy`` replicates over its cores.

Whatever goes wrong on the way (no TPU here, no name to look one up by, a name that
does not resolve, the Cloud TPU client missing) becomes one :class:`DlpipeError` that
says which step failed, what was tried and what to check.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from dlpipe.errors import DlpipeError

#: ``tpu:`` value for the TPU attached to this VM (a Cloud TPU VM): nothing to connect to.
LOCAL = "local"

#: The steps, as an error names the one that failed.
STEPS = (
    "finding the TPU (TPUClusterResolver)",
    "connecting to the TPU cluster (tf.config.experimental_connect_to_cluster)",
    "initialising the TPU system (tf.tpu.experimental.initialize_tpu_system)",
    "creating the TPUStrategy",
)


def tpu_strategy(params: Any) -> Any:
    """Resolve, connect to and initialise the TPU ``params`` name; return a TPUStrategy."""
    step = STEPS[0]
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=params.tpu, zone=params.zone, project=params.project
        )
        if params.tpu != LOCAL:
            step = STEPS[1]
            tf.config.experimental_connect_to_cluster(resolver)
        step = STEPS[2]
        tf.tpu.experimental.initialize_tpu_system(resolver)
        step = STEPS[3]
        strategy = tf.distribute.TPUStrategy(resolver)
    except Exception as exc:  # every upstream failure becomes one clear message
        raise DlpipeError(failure_message(params, step, exc)) from exc
    print(f"strategy: tpu {describe(params)} with {strategy.num_replicas_in_sync} cores")
    _precision_note()
    return strategy


def describe(params: Any) -> str:
    """``tpu='my-tpu', zone='us-central1-b', project='p'``; unset ones say so (an unset
    ``tpu`` is looked up in ``TPU_NAME``, then in the Cloud TPU VM's configuration)."""
    if params.tpu:
        parts = [f"tpu={params.tpu!r}"]
    elif os.environ.get("TPU_NAME"):
        parts = [f"tpu=(not set; TPU_NAME={os.environ['TPU_NAME']!r})"]
    else:
        parts = ["tpu=(not set)"]
    for key in ("zone", "project"):
        value = getattr(params, key)
        parts.append(f"{key}={value!r}" if value else f"{key}=(not set)")
    return ", ".join(parts)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The upstream error in one short line (TF's messages run on for kilobytes)."""
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def failure_message(params: Any, step: str, exc: BaseException) -> str:
    """What failed, with what, why (upstream's words) and what to check."""
    checks = []
    if not params.tpu:
        checks.append(
            "no TPU was named and none could be discovered (from TPU_NAME or a Cloud "
            "TPU VM's configuration): set strategy.params.tpu to the TPU's name, a "
            "grpc://HOST:8470 address, or 'local' on a TPU VM"
        )
    elif params.tpu == LOCAL:
        checks.append(
            "tpu: local needs a Cloud TPU VM with its TPU attached, and TensorFlow built "
            "with TPU support (the tensorflow-tpu / libtpu wheels); no TPU was found on "
            "this machine"
        )
    elif params.tpu.startswith("grpc://"):
        checks.append(
            f"that {params.tpu} is a TPU worker's address reachable from this machine "
            "(host and port, usually 8470)"
        )
    else:
        checks.append(
            f"that a TPU named {params.tpu!r} exists in that zone and project "
            "(gcloud compute tpus list --zone ZONE --project PROJECT), that zone and "
            "project are set when this machine is not a VM in them, that the "
            "cloud-tpu-client package is installed and this machine's credentials may "
            "use the TPU"
        )
    checks.append("for a CPU or GPU run, use another strategy (auto, mirrored, ...)")
    return (
        f"strategy tpu: could not start the TPU ({describe(params)}): {step} failed with "
        f"{_first_line(exc)}. Check {'; '.join(checks)}."
    )


def _precision_note() -> None:
    """TPUs compute in bfloat16: say so when the spec kept float32."""
    import keras

    policy = keras.mixed_precision.global_policy().name
    if policy != "mixed_bfloat16":
        print(f"strategy: tpu with precision {policy}; precision: mixed_bfloat16 is the "
              "usual choice on TPUs (bfloat16 compute, float32 weights)")
