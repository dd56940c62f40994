"""The driver: resolves the run, connects to Ray, builds the `TorchTrainer`.

Order matters: every check that can fail (config, dataset, tracking server)
runs before a Ray worker starts, so a bad run costs seconds, not a cluster
start-up.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from data_pipeline import storage
from data_pipeline.ingest import DATASET_NAME, RowOrderDataConfig, RowPlan, shard_listing
from data_pipeline.manifest import manifest_hash, read_manifest
from data_pipeline.prepare import ensure_dataset
from data_pipeline.reader import first_row_tokens
from data_pipeline.stream import Shard
from gptdist import tracking
from gptdist.checkpoint import (META_FILE, MODEL_FILE, CheckpointError, check_resumable, local_checkpoint_folder,
                                read_meta, verify_file)
from gptdist.checkpoint_source import (checkpoint_folders, latest_ray_checkpoint,
                                       ray_latest_checkpoint_name, resume_step)
from gptdist.config import Config, flatten
from gptdist import memory_estimate
from gptdist.model import GPT, analytic_num_params
from gptdist.precision_probe import CACHE_DIR_ENV
from gptdist.ray_session import connect_ray, start_local_ray, use_gpu  # noqa: F401 (evaluate, tune, tests)
from gptdist.redaction import redact_text, redact_uri
from gptdist.tokenizer import EOT_TOKEN, decode, encode
from gptdist.train_loop import train_worker


def default_run_name(cfg: Config) -> str:
    m = cfg.model.to_gpt_config()
    return f"gpt-L{m.n_layer}H{m.n_head}E{m.n_embd}-{datetime.now():%Y%m%d-%H%M%S}"


def storage_path(cfg: Config) -> str:
    """Ray needs an absolute local path; URIs (s3://, gs://) pass through."""
    path = cfg.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


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


@dataclass
class DatasetInfo:
    path: str  # an absolute local path or a URI
    manifest: dict
    manifest_sha256: str

    def shards(self, split: str) -> list[Shard]:
        # ensure_dataset has already verified every shard against the manifest.
        return [Shard(storage.join(self.path, split, s["file"]), s["first_row"], s["rows"])
                for s in self.manifest["splits"][split]["shards"]]

    def to_loop_config(self) -> dict[str, Any]:
        def listing(split: str):
            return [[s.path, s.first_row, s.rows] for s in self.shards(split)]

        return {"path": self.path, "manifest_sha256": self.manifest_sha256,
                "train_shards": listing("train"), "val_shards": listing("val")}


def open_dataset(cfg: Config) -> DatasetInfo:
    """The prepared dataset, validated against its manifest and the model's
    block size (prepared first when it is the embedded default and absent)."""
    path = storage.normalize(ensure_dataset(cfg))
    return DatasetInfo(path, read_manifest(path), manifest_hash(path))


def dataset_prompt(dataset: DatasetInfo, max_tokens: int = 8) -> str:
    """A sample prompt that belongs to the dataset: in the first validation
    row, the first line that names a speaker ("ROMEO:"), else its first
    non-empty line, cut to `max_tokens` tokens."""
    text = decode([t for t in first_row_tokens(dataset.path, "val") if t != EOT_TOKEN])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "\n"
    speaker = next((line for line in lines if re.fullmatch(r"[A-Z][A-Za-z .'-]{0,30}:", line)), None)
    return speaker or decode(encode(lines[0])[:max_tokens])


def data_params(dataset: DatasetInfo) -> dict[str, str]:
    """The run's data as the dataset itself records it (not the config's
    `data.sources`, which only says what to prepare when it is absent)."""
    return {"data.sources": dataset.manifest.get("sources", []), "data.manifest_sha256": dataset.manifest_sha256}


def log_dataset_input(client, run_id: str, dataset: DatasetInfo) -> None:
    """The dataset in MLflow's own Datasets record of the run (the
    "Datasets used" column of the UI): name, manifest hash, location."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    splits = dataset.manifest.get("splits", {})
    profile = {split: {"rows": info.get("rows"), "tokens": info.get("tokens")} for split, info in splits.items()}
    entry = Dataset(name=dataset_name(dataset.path), digest=dataset.manifest_sha256[:16],
                    source_type="gptdist-tokens", source=json.dumps({"uri": redact_uri(dataset.path)}),
                    profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(entry, tags=[InputTag("mlflow.data.context", "training")])])


def dataset_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def train_datasets(cfg: Config, dataset: DatasetInfo) -> dict[str, Any]:
    """The `datasets` and `dataset_config` of the TorchTrainer: the train
    split's shard listing, which RowOrderDataConfig turns into each rank's
    rows (data_pipeline.ingest); nothing when workers read shards directly."""
    if cfg.data.ingest != "ray_data":
        return {}
    plan = RowPlan(seed=cfg.data.seed, global_batch=cfg.train.global_batch_size,
                   micro_batch=cfg.train.micro_batch_size, max_steps=cfg.train.max_steps,
                   vocab_size=cfg.model.vocab_size)
    run_folder = storage.join(storage_path(cfg), cfg.train.run_name)
    return {"datasets": {DATASET_NAME: shard_listing(dataset.shards("train"))},
            "dataset_config": RowOrderDataConfig(plan, functools.partial(resume_step, run_folder),
                                                 read_cpus=cfg.data.read_cpus,
                                                 env=storage.endpoint_env())}


class StorageError(OSError):
    pass


def check_storage(cfg: Config, num_params: int) -> None:
    """A runs folder that cannot take a checkpoint fails now, not after the
    first hour of training. Estimate: weights + AdamW moments in fp32.
    Object storage gets a write probe; it has no free space to check."""
    path = storage.normalize(storage_path(cfg))
    if storage.is_uri(path):
        probe = storage.join(path, f".write-probe-{os.getpid()}")
        try:
            storage.write_bytes(probe, b"0")
            storage.delete(probe)
        except OSError as e:
            raise StorageError(f"ray.storage_path={path} is not writable: {e}") from None
        return
    needed = num_params * 4 * 3 * 2  # one checkpoint being written beside the latest kept
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise StorageError(f"ray.storage_path={path} is not writable: {e}") from None
    if free < needed:
        raise StorageError(
            f"ray.storage_path={path} has {free / 2**20:.1f} MiB free; checkpoints of this model "
            f"need about {needed / 2**20:.1f} MiB"
        )


def check_resume_compatible(cfg: Config, dataset: DatasetInfo) -> None:
    """When the run name already has checkpoints, they must be this model's
    shape, global batch and dataset: checked before any worker starts
    (reading only meta.json and the weights' sha256, also in object storage)."""
    path = storage.normalize(storage_path(cfg))
    run_dir = storage.join(path, cfg.train.run_name)
    try:
        if not checkpoint_folders(run_dir):
            return
    except storage.StorageError as e:
        raise StorageError(f"ray.storage_path={path} cannot be read: {e}") from None
    try:
        latest = latest_ray_checkpoint(run_dir)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume run {cfg.train.run_name}: {e}; remove {run_dir} to train it "
                              "from the start, or choose another train.run_name") from None
    registered = ray_latest_checkpoint_name(run_dir)
    if registered and registered != str(latest).rsplit("/", 1)[-1]:
        print(f"checkpoint {storage.join(run_dir, registered)} is incomplete ({META_FILE} missing): "
              f"resuming from {latest}, the latest complete one")
    meta = read_meta(latest)
    verify_file(latest, MODEL_FILE, meta)
    check_resumable(meta, cfg.model.to_gpt_config(), cfg.train.global_batch_size, dataset.manifest_sha256,
                    f"{cfg.train.run_name} ({latest})")


def estimate_worker_memory(cfg: Config, micro_batch: int | None = None) -> memory_estimate.WorkerMemory:
    gpt = cfg.model.to_gpt_config()
    return memory_estimate.worker_memory(gpt, analytic_num_params(gpt), micro_batch or cfg.train.micro_batch_size,
                                         chunked_loss=cfg.train.chunked_loss is not False,
                                         ddp=cfg.ray.num_workers > 1)


# GPU memory is not known to the driver: auto stops at this micro batch there.
GPU_AUTO_MICRO_BATCH_CAP = 16


def resolve_micro_batch(cfg: Config) -> None:
    """train.micro_batch_size=auto becomes each worker's share of the global
    batch, lowered to the largest divisor of it whose memory estimate fits
    the worker's part of its node (CPU), or at most 16 (GPU)."""
    if cfg.train.micro_batch_size != "auto":
        return
    rows = cfg.train.global_batch_size // cfg.ray.num_workers
    if use_gpu(cfg):
        micro = memory_estimate.auto_micro_batch(rows, lambda m: True, GPU_AUTO_MICRO_BATCH_CAP)
    else:
        node_memory, workers_by_cpu = memory_estimate.largest_node(ray.nodes(), cfg.ray.cpus_per_worker)
        budget = node_memory // min(cfg.ray.num_workers, workers_by_cpu)
        micro = memory_estimate.auto_micro_batch(rows, lambda m: estimate_worker_memory(cfg, m).total <= budget)
    cfg.train.micro_batch_size = micro
    if micro < rows:
        print(f"train.micro_batch_size auto: {micro} ({rows} sequences per worker per step in "
              f"{rows // micro} micro-steps, to fit memory)")


def check_memory(cfg: Config) -> None:
    """A configuration whose CPU workers cannot fit in the memory of the
    node they would share is refused now, naming the estimate and the knobs
    (gptdist.memory_estimate), instead of by Ray's memory monitor minutes
    into the run. GPU workers hold their state on the device: not checked."""
    if use_gpu(cfg):
        return
    node_memory, workers_by_cpu = memory_estimate.largest_node(ray.nodes(), cfg.ray.cpus_per_worker)
    memory_estimate.check_fits(estimate_worker_memory(cfg), min(cfg.ray.num_workers, workers_by_cpu), node_memory)


def run_params(cfg: Config, model_params: int, flops_per_token: int) -> dict[str, Any]:
    """The whole resolved config, flattened, plus derived values."""
    return {
        **flatten(cfg.to_dict()),
        "derived.num_params": model_params,
        "derived.flops_per_token": flops_per_token,
        "derived.global_batch_tokens": cfg.train.global_batch_size * cfg.model.block_size,
        "derived.world_size": cfg.ray.num_workers,
    }


# glibc malloc gives large freed blocks back to the kernel (blocks over its
# mmap threshold, trimmed heap tops, whole thread heaps), so every training
# step page-faults and zeroes its fresh activations and gradients again.
# Never mapping, trimming or dropping heaps keeps that memory for reuse, at
# the cost of some worker RSS (the figures are in the README's benchmark
# notes). glibc reads these only at process start, hence the workers'
# environment.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62), "MALLOC_TOP_PAD_": str(64 * 2**20)}


def worker_runtime_env(cfg: Config) -> dict:
    """The workers' environment: the malloc settings above, the driver's
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


def build_trainer(cfg: Config, dataset: DatasetInfo, coordinator, extra_loop_config: dict | None = None,
                  callbacks: list | None = None) -> TorchTrainer:
    os.environ[CONTROLLER_POLL_ENV] = str(cfg.ray.controller_poll_s)
    run_dir = Path(storage_path(cfg)) / cfg.train.run_name if "://" not in storage_path(cfg) else None
    loop_config = {
        "config": cfg.to_dict(),
        "dataset": dataset.to_loop_config(),
        "run_folder": storage.join(storage_path(cfg), cfg.train.run_name),
        "fault_marker_dir": str(run_dir or tempfile.gettempdir()),
        **(extra_loop_config or {}),
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
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


def open_tracking(cfg: Config, params: dict, kind: str = "train", parent_run_id: str | None = None):
    """(client, run_id, resumed), or (None, None, False) when tracking is
    optional and the server is down."""
    uri = tracking.tracking_uri(cfg.tracking)
    try:
        tracking.check_reachable(uri)
        client = MlflowClient(uri)
        experiment_id = tracking.get_or_create_experiment(client, cfg.tracking, uri)
    except Exception as e:
        if cfg.tracking.required:
            raise tracking.TrackingUnavailableError(
                f"{e} (tracking.uri / MLFLOW_TRACKING_URI = {redact_uri(uri)}; "
                "set tracking.required=false to train without it)"
            ) from None
        print(f"warning: MLflow tracking disabled for this run: {e}")
        return None, None, False
    tags = {**tracking.environment_tags(), tracking.RUN_KIND_TAG: kind}
    if parent_run_id:
        tags[tracking.PARENT_TAG] = parent_run_id
    run_id, resumed = tracking.start_or_resume_run(client, experiment_id, cfg.train.run_name, params, tags)
    return client, run_id, resumed


def train_main(cfg: Config, force_local: bool = False, extra_loop_config: dict | None = None,
               parent_run_id: str | None = None, kind: str = "train",
               callbacks: list | None = None) -> dict[str, Any]:
    """Train one run to the end and return its summary.

    `callbacks` are extra `ray.train.UserCallback`s (Tune passes its
    `TuneReportCallback`); `parent_run_id` nests the MLflow run (a Tune trial
    under its sweep)."""
    extra_loop_config = {"driver_start_time": time.time(), **(extra_loop_config or {})}
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
        coordinator = (tracking.MlflowCoordinator(
            tracking.tracking_uri(cfg.tracking), run_id, cfg.tracking.log_checkpoints,
            logged_through=tracking.last_logged_step(client, run_id) if resumed else 0) if client else None)
        print(f"run {cfg.train.run_name}: {params['derived.num_params'] / 1e6:.2f}M parameters, "
              f"{cfg.ray.num_workers} worker(s), data {dataset.path}"
              + (f", resuming MLflow run {run_id}" if resumed else ""))
        print(f"starting {cfg.ray.num_workers} Ray Train worker(s) ...", flush=True)
        extra_loop_config["mlflow_run_id"] = run_id
        trainer = build_trainer(cfg, dataset, coordinator, extra_loop_config, callbacks)
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
            ray.shutdown()


def finish_training(cfg: Config, result, client, run_id) -> dict[str, Any]:
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    if checkpoint_dir and storage.is_uri(storage_path(cfg)):
        # Ray gives the path inside its filesystem ("bucket/key"): the URI
        # has the storage path's scheme.
        scheme = storage_path(cfg).partition("://")[0]
        checkpoint_dir = storage.normalize(f"{scheme}://{checkpoint_dir}")
    meta = read_meta(checkpoint_dir) if checkpoint_dir else {}
    returned = result.return_value or {}
    summary = {
        "run_name": cfg.train.run_name,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking.tracking_uri(cfg.tracking),
        "checkpoint": checkpoint_dir,
        "step": meta.get("step", returned.get("step")),
        "val_loss": (result.metrics or {}).get("val/loss", returned.get("val_loss")),
        "sample": (result.metrics or {}).get("sample"),
        "param_digests": returned.get("param_digests"),
    }
    if client is not None:
        try:
            log_final_artifacts(cfg, result, client, run_id)
        except Exception as e:  # the server went away mid-run: the model is safe on disk
            print(f"warning: could not finish MLflow run {run_id} ({e}); "
                  f"the final checkpoint is at {checkpoint_dir}")
    return summary


def log_final_artifacts(cfg: Config, result, client, run_id: str) -> None:
    """The final model (loadable with `--from runs:/<id>`), the loss curve,
    and the run's FINISHED status."""
    if result.checkpoint and cfg.tracking.log_checkpoints != "none":
        with local_checkpoint_folder(result.checkpoint) as folder:
            client.log_artifacts(run_id, folder, "model")
    with tempfile.TemporaryDirectory() as tmp:
        png = tracking.plot_loss_curve(client, run_id, Path(tmp) / "loss_curve.png")
        if png:
            client.log_artifact(run_id, str(png))
    tracking.finish_run(client, run_id)


def print_summary(cfg: Config, summary: dict[str, Any]) -> None:
    print()
    print(f"run {summary['run_name']} finished at step {summary['step']}")
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
