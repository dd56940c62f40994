"""The two contracts around a training worker, as small typed structures:
what the driver hands every worker (`WorkerSpec`), and what a worker
reports at a step (`StepReport`), which the MLflow coordinator, Ray Tune
and the driver's summary read back; and the malloc settings every worker
process starts with (`WORKER_MALLOC_ENV`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipeline.stream import Shard
from gptdist.fault_injection import FaultHooks


# glibc malloc gives large freed blocks back to the kernel (blocks over its
# mmap threshold, trimmed heap tops, whole thread heaps), so every training
# step page-faults and zeroes its fresh activations and gradients again.
# Never mapping, trimming or dropping heaps keeps that memory for reuse, at
# the cost of some worker RSS (the figures are in the README's benchmark
# notes). A Ray Train worker runs the training function in a thread of its
# own, not the main thread, and glibc serves a thread from a secondary arena
# of mmap'd heaps that it still shrinks and drops: on a Zen-4 VM a `mini` bf16
# step faulted in about 160 MB afresh (38-41k faults) under Ray Train against
# none in a plain Ray actor. One arena (`MALLOC_ARENA_MAX=1`) puts every
# thread on the main heap, where the settings above hold: 0.9-2.6k faults a
# step, and the step as fast as in the actor. glibc reads these only at
# process start, hence the workers' environment.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62), "MALLOC_TOP_PAD_": str(64 * 2**20),
                     "MALLOC_ARENA_MAX": "1"}


@dataclass(frozen=True)
class DatasetSpec:
    path: str  # a local path or a URI
    manifest_sha256: str
    train_shards: list[Shard]
    val_shards: list[Shard]


@dataclass(frozen=True)
class WorkerSpec:
    config: dict[str, Any]  # Config.to_dict(), resolved by the driver
    dataset: DatasetSpec
    run_folder: str  # {ray.storage_path}/{run name}: the run's checkpoints
    driver_start_time: float  # for time_to_first_step_s
    mlflow_run_id: str | None = None  # recorded in each checkpoint
    hooks: FaultHooks = field(default_factory=FaultHooks)


# Keys of the report dict that are not metrics.
STEP_KEY, FACTS_KEY, SAMPLE_KEY = "step", "run_facts", "sample"


@dataclass
class StepReport:
    """A step's metrics (flat, so Ray Tune can read `val/loss`), the facts
    about the run only a worker knows (precision, device, ...: tags for
    MLflow, sent once), and a text sample at evaluations."""

    step: int
    metrics: dict[str, float]
    facts: dict[str, str] = field(default_factory=dict)
    sample: str | None = None

    def to_ray(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.metrics, STEP_KEY: self.step}
        if self.facts:
            out[FACTS_KEY] = self.facts
        if self.sample is not None:
            out[SAMPLE_KEY] = self.sample
        return out

    @classmethod
    def from_ray(cls, report: dict[str, Any]) -> StepReport:
        metrics = {k: float(v) for k, v in report.items()
                   if k not in (STEP_KEY, FACTS_KEY, SAMPLE_KEY)
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return cls(int(report.get(STEP_KEY, 0)), metrics, dict(report.get(FACTS_KEY, {})), report.get(SAMPLE_KEY))
