"""The driver of `gptdist train`: resolves the run, connects to Ray, runs
the pre-flight checks, opens the MLflow run, builds the `TorchTrainer`
and reports what it trained.

Order matters: every check that can fail (config, dataset, tracking server)
runs before a Ray worker starts, so a bad run costs seconds, not a cluster
start-up.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from data_pipeline import storage
from gptdist import memory_estimate, tracking
from gptdist.checkpoint import read_meta
from gptdist.config import Config
from gptdist.fault_injection import FaultHooks
from gptdist.mlflow_coordinator import MlflowCoordinator
from gptdist.model import GPT
from gptdist.precision_probe import CACHE_DIR_ENV
from gptdist.preflight import check_memory, check_resume_compatible, check_storage, estimate_worker_memory, resolve_micro_batch
from gptdist.ray_session import connect_ray, shutdown_ray, storage_path, use_gpu
from gptdist.redaction import redact_text, redact_uri
from gptdist.run_data import DatasetInfo, data_params, dataset_name, dataset_prompt, log_dataset_input, open_dataset, train_datasets
from gptdist.tracking import log_final_artifacts, open_tracking, run_params
from gptdist.train_loop import train_worker
from gptdist.worker_contract import WORKER_MALLOC_ENV, StepReport, WorkerSpec


def default_run_name(cfg: Config) -> str:
    m = cfg.model.to_gpt_config()
    return f"gpt-L{m.n_layer}H{m.n_head}E{m.n_embd}-{datetime.now():%Y%m%d-%H%M%S}"


def scaling_config(cfg: Config) -> ScalingConfig:
    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.ray.num_workers,
        use_gpu=gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.ray.placement_strategy,
    )


def worker_runtime_env(cfg: Config) -> dict:
    """The workers' environment: the malloc settings (WORKER_MALLOC_ENV), the driver's
    object-store endpoint (AWS_ENDPOINT_URL, region), so that workers and
    their Ray Data readers reach the bucket the driver verified, and the
    precision probe's cache folder when one is set."""
    env = {**(WORKER_MALLOC_ENV if cfg.ray.worker_keeps_freed_memory else {}), **storage.endpoint_env()}
    if os.environ.get(CACHE_DIR_ENV):  # where the precision probe keeps its figures
        env[CACHE_DIR_ENV] = os.environ[CACHE_DIR_ENV]
    return {"env_vars": env} if env else {}


# Ray Train reads its controller's poll interval only from this variable (it
# passes the driver's value on to the controller actor). At its default of
# 2 s, runs that report every step were held to about one step per 2 s.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def build_trainer(cfg: Config, dataset: DatasetInfo, coordinator, hooks: FaultHooks, driver_start_time: float,
                  mlflow_run_id: str | None, callbacks: list | None = None) -> TorchTrainer:
    os.environ[CONTROLLER_POLL_ENV] = str(cfg.ray.controller_poll_s)
    run_dir = Path(storage_path(cfg)) / cfg.train.run_name if "://" not in storage_path(cfg) else None
    hooks = dataclasses.replace(hooks, fail_at_step=cfg.train.fail_at_step,
                                marker_dir=str(run_dir or tempfile.gettempdir()))
    spec = WorkerSpec(config=cfg.to_dict(), dataset=dataset.to_spec(),
                      run_folder=storage.join(storage_path(cfg), cfg.train.run_name),
                      driver_start_time=driver_start_time, mlflow_run_id=mlflow_run_id, hooks=hooks)
    return TorchTrainer(
        train_worker,
        train_loop_config=spec,
        scaling_config=scaling_config(cfg),
        **train_datasets(cfg, dataset),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            callbacks=[c for c in [coordinator, *(callbacks or [])] if c is not None],
            # Ray Train's INFO lines repeat every report (samples included);
            # the workers print their own one-line progress.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_runtime_env(cfg),
        ),
    )


def train_main(cfg: Config, force_local: bool = False, hooks: FaultHooks | None = None,
               parent_run_id: str | None = None, kind: str = "train",
               callbacks: list | None = None) -> dict[str, Any]:
    """Train one run to the end and return its summary.

    `callbacks` are extra `ray.train.UserCallback`s (Tune passes its
    `TuneReportCallback`); `parent_run_id` nests the MLflow run (a Tune trial
    under its sweep)."""
    started = time.time()
    cfg.train.run_name = cfg.train.run_name or default_run_name(cfg)
    started_ray = connect_ray(cfg, force_local)
    try:
        resolve_micro_batch(cfg)
        check_memory(cfg)
        dataset = open_dataset(cfg)
        model = GPT(cfg.model.to_gpt_config())
        if cfg.train.sample_prompt is None:
            cfg.train.sample_prompt = dataset_prompt(dataset)
        params = {**run_params(cfg, model.num_params(), model.flops_per_token()), **data_params(dataset)}
        check_storage(cfg, model.num_params())
        check_resume_compatible(cfg, dataset)
        del model
        client, run_id, resumed = open_tracking(cfg, params, kind, parent_run_id)
        if client is not None:
            client.set_tag(run_id, "gptdist.dataset_manifest_sha256", dataset.manifest_sha256)
            client.set_tag(run_id, "gptdist.dataset", dataset_name(dataset.path))
            log_dataset_input(client, run_id, dataset)
            client.set_tag(run_id, "gptdist.device_type", "cuda" if use_gpu(cfg) else "cpu")
            client.log_text(run_id, redact_text(cfg.to_yaml()), "config.yaml")
            client.log_dict(run_id, dataset.manifest, "dataset_manifest.json")
        coordinator = (MlflowCoordinator(
            tracking.tracking_uri(cfg.tracking), run_id, cfg.tracking.log_checkpoints,
            logged_through=tracking.last_logged_step(client, run_id) if resumed else 0) if client else None)
        print(f"run {cfg.train.run_name}: {params['derived.num_params'] / 1e6:.2f}M parameters, "
              f"{cfg.ray.num_workers} worker(s), data {dataset.path}"
              + (f", resuming MLflow run {run_id}" if resumed else ""))
        print(f"starting {cfg.ray.num_workers} Ray Train worker(s) ...", flush=True)
        trainer = build_trainer(cfg, dataset, coordinator, hooks or FaultHooks(), started, run_id, callbacks)
        try:
            result = trainer.fit()
        except BaseException as e:
            if memory_estimate.is_out_of_memory(e):
                e = memory_estimate.WorkerOutOfMemoryError(
                    f"a training worker was killed by Ray's memory monitor: the node ran out of memory "
                    f"(estimated per worker: {estimate_worker_memory(cfg).describe()} GiB); lower "
                    "train.micro_batch_size or put fewer workers on a node")
            if client is not None:
                tracking.finish_run(client, run_id, e)
            if tracking.is_interruption(e):
                # Ray Train's SIGINT handler aborts the run and exits with
                # SystemExit; callers see the Ctrl-C it was.
                print(f"run {cfg.train.run_name} interrupted; the same command resumes it "
                      "from its latest checkpoint")
                raise KeyboardInterrupt from None
            if isinstance(e, memory_estimate.WorkerOutOfMemoryError):
                raise e from None
            raise
        summary = finish_training(cfg, result, client, run_id)
        print_summary(cfg, summary)
        return summary
    finally:
        if started_ray:
            shutdown_ray()


def finish_training(cfg: Config, result, client, run_id) -> dict[str, Any]:
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    if checkpoint_dir and storage.is_uri(storage_path(cfg)):
        # Ray gives the path inside its filesystem ("bucket/key"): the URI
        # has the storage path's scheme.
        scheme = storage_path(cfg).partition("://")[0]
        checkpoint_dir = storage.normalize(f"{scheme}://{checkpoint_dir}")
    meta = read_meta(checkpoint_dir) if checkpoint_dir else {}
    returned = result.return_value or {}
    last = StepReport.from_ray(result.metrics or {})
    summary = {
        "run_name": cfg.train.run_name,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking.tracking_uri(cfg.tracking),
        "checkpoint": checkpoint_dir,
        "step": meta.get("step", returned.get("step")),
        "val_loss": last.metrics.get("val/loss", returned.get("val_loss")),
        "sample": last.sample,
        "param_digests": returned.get("param_digests"),
    }
    if client is not None:
        try:
            tags = parameter_tags(summary["param_digests"])
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
            log_final_artifacts(cfg, result, client, run_id)
        except Exception as e:  # the server went away mid-run: the model is safe on disk
            print(f"warning: could not finish MLflow run {run_id} ({e}); "
                  f"the final checkpoint is at {checkpoint_dir}")
    return summary


def workers_agree(digests: list[str]) -> bool:
    """DDP keeps every rank's parameters bit-identical: False means the replicas diverged."""
    return len(set(digests)) == 1


def parameter_tags(digests: list[str] | None) -> dict[str, str]:
    """The final parameters' sha256 (rank 0's; runs trained alike end with
    the same), and whether every worker ended with the same."""
    if not digests:
        return {}
    return {"gptdist.param_sha256": digests[0], "gptdist.workers_agree": str(workers_agree(digests)).lower()}


def parameter_line(digests: list[str]) -> str:
    line = f"final parameters: sha256 {digests[0][:16]}"
    if len(digests) == 1:
        return line
    if workers_agree(digests):
        return f"{line}, identical on all {len(digests)} workers"
    return ("warning: the workers ended with different parameters (sha256 by rank: "
            + ", ".join(d[:16] for d in digests) + ")")


def print_summary(cfg: Config, summary: dict[str, Any]) -> None:
    print()
    print(f"run {summary['run_name']} finished at step {summary['step']}")
    if summary["param_digests"]:
        print(parameter_line(summary["param_digests"]))
    if summary["val_loss"] is not None:
        print(f"final validation loss: {summary['val_loss']:.4f}")
    if summary["sample"]:
        print("sample:\n" + "-" * 40 + f"\n{summary['sample']}\n" + "-" * 40)
    print(f"checkpoint: {summary['checkpoint']}")
    uri = redact_uri(summary["tracking_uri"])
    if summary["mlflow_run_id"]:
        print(f"MLflow run {summary['mlflow_run_id']} in experiment '{cfg.tracking.experiment}'")
        if uri.startswith("sqlite:"):
            print(f"open the runs:  mlflow ui --backend-store-uri {uri} --port 5000   (then http://127.0.0.1:5000)")
        else:
            print(f"open the runs:  {uri}")
        print("compare in the terminal:  gptdist runs")
