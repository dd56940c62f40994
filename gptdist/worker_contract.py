"""The two contracts around a training worker, as small typed structures:
what the driver hands every worker (`WorkerSpec`), and what a worker
reports at a step (`StepReport`), which the MLflow coordinator, Ray Tune
and the driver's summary read back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipeline.stream import Shard
from gptdist.fault_injection import FaultHooks


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
