"""Built-in TensorFlow distribution strategies."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class TPUParams(Params):
    """A Cloud TPU (TPUStrategy). Pair it with the spec's ``precision: mixed_bfloat16``,
    the documented setting for TPUs: their matrix units compute in bfloat16, and the
    weights stay float32."""

    tpu: str | None = Field(
        None,
        min_length=1,
        description="The TPU: its name (a Cloud TPU node, found through zone and project), "
        "a grpc://HOST:8470 worker address, or 'local' for the TPU of this Cloud TPU VM. "
        "Default: TPU_NAME, else the TPU VM's own configuration. Use with "
        "precision: mixed_bfloat16, the pairing TPUs are built for.",
    )
    zone: str | None = Field(
        None, description="GCP zone of a TPU given by name. Default: this VM's zone."
    )
    project: str | None = Field(
        None, description="GCP project of a TPU given by name. Default: this VM's project."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TPUParams:
        tpu = self.tpu or ""
        if "://" in tpu and not tpu.startswith("grpc://"):
            raise ValueError(f"tpu {tpu!r}: an address must start with grpc://")
        named = [k for k in ("zone", "project") if getattr(self, k)]
        if named and (tpu == "local" or tpu.startswith("grpc://")):
            raise ValueError(
                f"{' and '.join(named)} only apply to a TPU given by name, not to tpu {tpu!r}"
            )
        return self


class MultiWorkerParams(Params):
    """Several worker processes, on one host or many (MultiWorkerMirroredStrategy).
    Without ``workers``, the cluster comes from ``TF_CONFIG``; ``dlpipe run SPEC
    --local-workers N`` starts N local workers with theirs. Who the workers are is not
    part of the run's identity (its folder and digest): a re-launch on other ports
    resumes the same run."""

    workers: list[str] | None = Field(
        None, min_length=1, exclude=True,
        description="Every worker's host:port, the chief first; the same list on every "
        "worker. Default: TF_CONFIG's cluster.",
    )
    index: int | None = Field(
        None, ge=0, exclude=True,
        description="This worker's place in workers (0: the chief); differs per worker, "
        "e.g. --set strategy.params.index=1.",
    )
    timeout_seconds: float | None = Field(
        600.0, gt=0,
        description="Longest wait of one collective op (an all-reduce) for the other "
        "workers before this worker gives up; bounds a hang on a stuck worker. A dead "
        "worker is noticed sooner, by TensorFlow's heartbeats. null: no limit.",
    )

    @model_validator(mode="after")
    def _one_cluster(self) -> MultiWorkerParams:
        if (self.workers is None) != (self.index is None):
            raise ValueError("workers and index go together: every worker's address, and "
                             "which of them this process is")
        if self.workers is not None and self.index is not None and self.index >= len(self.workers):
            raise ValueError(f"index {self.index} is outside the {len(self.workers)} workers")
        return self

    def worker_name(self) -> str | None:
        """``None`` on the chief, else ``worker-<i>``: read from these params or
        ``TF_CONFIG`` before TensorFlow loads (the engine and tracking ask it)."""
        from dlpipe.strategies.multi_worker import worker_name

        return worker_name(self)


@hookimpl
def register_strategies(register):
    register("auto", "dlpipe.strategies.impl:auto", DeviceParams,
             "Mirrored over all GPUs when there are several, else the default device.")
    register("cpu", "dlpipe.strategies.impl:cpu", DeviceParams, "One CPU device.")
    register("one_device", "dlpipe.strategies.impl:one_device", OneDeviceParams, "One named device.")
    register("mirrored", "dlpipe.strategies.impl:mirrored", MirroredParams,
             "Synchronous data parallelism over local devices (MirroredStrategy).")
    register("tpu", "dlpipe.strategies.tpu:tpu_strategy", TPUParams,
             "A Cloud TPU (TPUStrategy): by name, grpc:// address or 'local'; "
             "pair with precision: mixed_bfloat16.")
    register("multi_worker", "dlpipe.strategies.multi_worker:multi_worker", MultiWorkerParams,
             "Synchronous data parallelism over several processes "
             "(MultiWorkerMirroredStrategy); TF_CONFIG or --local-workers N.")
