"""The MLflow coordinator: a Ray Train callback on the controller that logs
what the workers report (`worker_contract.StepReport`) to one MLflow run."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray.train
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from gptdist.checkpoint import local_checkpoint_folder
from gptdist.redaction import redact_text
from gptdist.tracking import mlflow_client
from gptdist.worker_contract import StepReport

log = logging.getLogger("gptdist.tracking")  # the name its warnings have always had


class MlflowCoordinator(ray.train.UserCallback):
    """Logs what the workers report to one MLflow run.

    Runs on the Ray Train controller (`UserCallback`), so workers never talk
    to MLflow. Metrics are rank 0's (all ranks report the same all-reduced
    values). Should the tracking server go away mid-run, a metric batch that
    cannot be logged is dropped with a warning and training goes on; the
    number dropped is tagged on the run when the server is back.
    """

    RETRY_AFTER_S = 30.0  # after a failure, drop reports without trying for this long

    def __init__(self, tracking_uri: str, run_id: str, log_checkpoints: str, logged_through: int = 0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.log_checkpoints = log_checkpoints
        # Steps up to this one are in the run's history already. A run
        # resumed from a checkpoint retrains (bit-identically) the steps after
        # it that an earlier attempt logged; each step is logged once.
        self.logged_through = logged_through
        self.dropped = 0
        self._client: MlflowClient | None = None
        self._opening: threading.Thread | None = None
        self._down_until = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_opening": None}

    def __setstate__(self, state: dict) -> None:
        """Unpickled on the Train controller as it starts: the store is opened
        in a thread while the workers start (0.6 s of CPU for a SQLite store,
        on a core their start leaves idle), not at the first report, where on
        2 cores it slowed the training step it overlapped by a fifth."""
        self.__dict__.update(state)
        self._opening = threading.Thread(target=self._open_quietly, name="open-mlflow-store", daemon=True)
        self._opening.start()

    def _open_quietly(self) -> None:
        try:
            self._client = mlflow_client(self.tracking_uri)
        except Exception:  # tried again, and reported, at the first report
            self._client = None

    @property
    def client(self) -> MlflowClient:
        if self._opening is not None:
            self._opening.join()
            self._opening = None
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # An exception here would fail the training run: log or drop, never raise.
        try:
            self._log_report(metrics[0], checkpoint)
        except Exception as e:
            self.dropped += 1
            self._down_until = time.time() + self.RETRY_AFTER_S
            log.warning("MLflow logging failed (%s); dropping reports for %.0f s", e, self.RETRY_AFTER_S)

    def _log_report(self, reported: dict[str, Any], checkpoint) -> None:
        if time.time() < self._down_until:
            self.dropped += 1
            return
        report = StepReport.from_ray(reported)
        step = report.step
        for name, value in report.facts.items():  # what only a worker knows
            self.client.set_tag(self.run_id, f"gptdist.{name}", value)
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in report.metrics.items()])
        self.logged_through = step
        if report.sample is not None:
            self.client.log_text(self.run_id, report.sample, f"samples/step_{step:08d}.txt")
        if checkpoint is not None and self.log_checkpoints == "all":
            with local_checkpoint_folder(checkpoint) as folder:
                self.client.log_artifacts(self.run_id, folder, f"checkpoints/step_{step:08d}")
        if self.dropped:
            self.client.set_tag(self.run_id, "gptdist.dropped_metric_batches", str(self.dropped))

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        text = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                         for rank, error in sorted(worker_exceptions.items()))
        try:
            self.client.set_tag(self.run_id, "gptdist.last_worker_error", redact_text(text)[:5000])
        except Exception as e:
            log.warning("could not record a worker failure in MLflow: %s", e)
