"""The checks a training run passes before any worker starts, each failing
in seconds with a message naming what to change: the storage path is
writable, the checkpoints to resume from fit this run, the micro batch
(auto) and the workers fit the node's memory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import ray

from data_pipeline import storage
from gptdist import memory_estimate
from gptdist.checkpoint import META_FILE, MODEL_FILE, CheckpointError, check_resumable, read_meta, verify_file
from gptdist.checkpoint_source import checkpoint_folders, latest_ray_checkpoint, ray_latest_checkpoint_name
from gptdist.config import Config
from gptdist.model import analytic_num_params
from gptdist.ray_session import storage_path, use_gpu
from gptdist.run_data import DatasetInfo


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
                                         ddp=cfg.ray.num_workers > 1,
                                         matmul_attention=cfg.train.attention != "sdpa")


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
