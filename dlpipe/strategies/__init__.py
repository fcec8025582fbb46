"""Built-in TensorFlow distribution strategies."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlpipe import hookimpl
from dlpipe.params import Params


class DeviceParams(Params):
    logical_cpus: int | None = Field(
        None,
        ge=1,
        description="Split the CPU into N logical devices before TensorFlow starts "
        "(lets mirrored training be tried without GPUs).",
    )


class OneDeviceParams(DeviceParams):
    device: str = Field("/cpu:0", description="e.g. /gpu:0 or /cpu:0.")


class MirroredParams(DeviceParams):
    devices: list[str] | None = Field(
        None, description="Devices to mirror over. Default: every GPU, else every logical CPU."
    )
    cross_device_ops: Literal["nccl", "hierarchical_copy", "reduce_to_one"] | None = Field(
        None, description="nccl, hierarchical_copy or reduce_to_one. Default: TF's choice."
    )




@hookimpl
def register_strategies(register):
    register("auto", "dlpipe.strategies.impl:auto", DeviceParams,
             "Mirrored over all GPUs when there are several, else the default device.")
    register("cpu", "dlpipe.strategies.impl:cpu", DeviceParams, "One CPU device.")
    register("one_device", "dlpipe.strategies.impl:one_device", OneDeviceParams, "One named device.")
    register("mirrored", "dlpipe.strategies.impl:mirrored", MirroredParams,
             "Synchronous data parallelism over local devices (MirroredStrategy).")
