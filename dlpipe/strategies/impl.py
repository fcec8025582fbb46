"""Distribution strategies. Each factory runs before any other TensorFlow work."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dlpipe.errors import DlpipeError


def _split_cpu(n: int | None) -> None:
    if not n:
        return
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as exc:
        raise DlpipeError(
            f"strategy.params.logical_cpus={n}: TensorFlow was already initialised in this "
            "process, so the CPU can no longer be split; run in a fresh process"
        ) from exc


def auto(params: Any) -> Any:
    _split_cpu(params.logical_cpus)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def cpu(params: Any) -> Any:
    _split_cpu(params.logical_cpus)
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def one_device(params: Any) -> Any:
    _split_cpu(params.logical_cpus)
    return tf.distribute.OneDeviceStrategy(params.device)


def mirrored(params: Any) -> Any:
    _split_cpu(params.logical_cpus)
    devices = params.devices
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    ops = None
    if params.cross_device_ops:
        ops = {
            "nccl": tf.distribute.NcclAllReduce,
            "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
            "reduce_to_one": tf.distribute.ReductionToOneDevice,
        }[params.cross_device_ops]()
    elif not tf.config.list_logical_devices("GPU"):
        ops = tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)
    print(f"strategy: mirrored over {strategy.num_replicas_in_sync} devices")
    return strategy
