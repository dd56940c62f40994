"""The training loop: what runs in each Ray Train worker.

One worker is one DDP rank. It builds the GPT, restores the latest
checkpoint Ray Train hands it (after a worker failure or a restart of the
whole run), wraps the model with `ray.train.torch.prepare_model` (gloo on CPU,
NCCL on GPU) and trains on the rows `data_pipeline.stream` assigns to it,
which Ray Data reads for it (`data_pipeline.ingest`, from its dataset shard)
unless `data.ingest: direct`.
Every `log_interval` steps all ranks call `ray.train.report` (a barrier) with
the same metrics; rank 0 also attaches a checkpoint every
`checkpoint_interval` steps and at the end. Workers never talk to MLflow:
the coordinator on the driver side logs what they report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data_pipeline.ingest import DATASET_NAME, RayDataStream
from data_pipeline.stream import Shard, TrainStream, eval_batches
from gptdist.checkpoint import (
    META_FILE,
    check_resumable,
    clean_state_dict,
    load_model_state,
    load_train_state,
    local_checkpoint_folder,
    model_meta,
    save_checkpoint,
)
from gptdist.checkpoint_source import latest_ray_checkpoint
from gptdist.config import Config, config_from_dict, gradient_accumulation_steps
from gptdist.metrics import checked_peak, mfu, peak_flops
from gptdist.model import GPT
from gptdist.precision_probe import ProbeResult, cache_file, model_matmuls, probe_precision
from gptdist.tokenizer import EOT_TOKEN, decode, encode
from gptdist.fault_injection import (
    append_audit,
    maybe_die_while_checkpointing,
    maybe_inject_fault,
    poison_loss_from,
    write_pid,
)
from gptdist.train_step import (autocast_context, build_optimizer, learning_rate, optimizer_step, resolve_chunked_loss,
                                resolve_precision)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    nonfinite_steps: int = 0  # skipped in total
    nonfinite_in_a_row: int = 0


# --- building blocks ---------------------------------------------------------


def rng_state() -> dict:
    """Every generator a rank draws from, as tensors and JSON strings (a
    checkpoint loads with `weights_only=True`)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([name, keys.tolist(), pos, has_gauss, cached]),
        "python": json.dumps([version, list(words), gauss_next]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state, python_state = json.loads(state["numpy"]), json.loads(state["python"])
    # Checkpoints written before these were complete hold a bare list of words.
    if isinstance(numpy_state[0], str):
        name, keys, pos, has_gauss, cached = numpy_state
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if isinstance(python_state[0], int) and isinstance(python_state[1], list):
        version, words, gauss_next = python_state
        random.setstate((version, tuple(words), gauss_next))


def quiet_report_log() -> None:
    """Ray Train logs each `ray.train.report` (the whole metrics dict, ~1 KB,
    repeating the progress line) at INFO, under a logger named after its
    source file, which `LoggingConfig` does not reach."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its log lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def set_cpu_threads(cfg: Config) -> int:
    """Workers get OMP_NUM_THREADS from Ray; choose explicitly: the
    configured count, else this node's cores shared among its workers."""
    local_workers = ray.train.get_context().get_local_world_size()
    threads = cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // local_workers)
    torch.set_num_threads(threads)
    return threads


def probe_cpu_precision(cfg: Config, rank: int, world: int, chunked_loss: bool) -> ProbeResult:
    """`precision: auto` on CPU workers: rank 0 times fp32 against bf16 on
    this model's matmuls, or reads its machine's cached figures, while the
    other ranks wait at the broadcast (leaving it the cores); every rank
    trains in its choice."""
    result: list[ProbeResult | None] = [None]
    if rank == 0:
        matmuls = model_matmuls(cfg.model.to_gpt_config(), cfg.train.micro_batch_size, chunked_loss)
        result[0] = probe_precision(matmuls, cache_file())
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def open_train_stream(cfg: Config, shards: list[Shard], rank: int, world: int) -> RayDataStream | TrainStream:
    """This rank's micro-batches: from its Ray Data shard (every rank asks
    for it: `get_dataset_shard` is a barrier), or read from the shards."""
    if cfg.data.ingest == "ray_data":
        return RayDataStream(ray.train.get_dataset_shard(DATASET_NAME), shards,
                             global_batch=cfg.train.global_batch_size, micro_batch=cfg.train.micro_batch_size,
                             world_size=world, prefetch_batches=cfg.data.prefetch_batches)
    return TrainStream(shards, seed=cfg.data.seed, global_batch=cfg.train.global_batch_size,
                       micro_batch=cfg.train.micro_batch_size, rank=rank, world_size=world,
                       vocab_size=cfg.model.vocab_size)


# --- evaluation, samples, checkpoints ----------------------------------------


@torch.no_grad()
def training_sample(model: GPT, cfg: Config, device: torch.device) -> str:
    """A short seeded sample to watch the model learn (logged at each eval).
    Uses the model's own cache-free generate: cheap at these lengths."""
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    prompt = torch.tensor([encode(cfg.train.sample_prompt) or [EOT_TOKEN]], device=device)
    model.eval()
    out = model.generate(prompt, cfg.train.sample_tokens, temperature=0.8, top_k=200, generator=generator)
    model.train()
    return decode(out[0].tolist())


@torch.no_grad()
def evaluate(model, shards: list[Shard], cfg: Config, rank: int, world: int, device, precision) -> float:
    """Mean validation loss over the same rows every time, averaged over
    all workers."""
    model.eval()
    losses = []
    for tokens in eval_batches(shards, num_batches=cfg.train.eval_batches,
                               micro_batch=cfg.train.micro_batch_size, rank=rank, world_size=world,
                               vocab_size=cfg.model.vocab_size):
        tokens = tokens.to(device, non_blocking=True)
        with autocast_context(precision, device):
            _, loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
        losses.append(loss.float())
    model.train()
    return all_reduce_mean(torch.stack(losses).mean().reshape(1))[0].item()


def write_checkpoint(folder: Path, model, optimizer, scaler, state: LoopState, cfg: Config,
                     stream: RayDataStream | TrainStream, loop_config: dict) -> None:
    train_state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_state(),
        "nonfinite_steps": state.nonfinite_steps,
    }
    meta = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "data_position": stream.position(state.step),
        "global_batch_size": cfg.train.global_batch_size,
        "model": model_meta(cfg.model.to_gpt_config()),
        "dataset_manifest_sha256": loop_config["dataset"]["manifest_sha256"],
        "data_path": loop_config["dataset"]["path"],
        "mlflow_run_id": loop_config.get("mlflow_run_id"),
        "config": cfg.to_dict(),
    }
    hooks = loop_config.get("test_hooks", {})
    save_checkpoint(folder, clean_state_dict(model), train_state, meta,
                    before_meta=lambda: maybe_die_while_checkpointing(hooks, state.step, loop_config["fault_marker_dir"]))


def checkpoint_to_resume(loop_config: dict) -> ray.train.Checkpoint | None:
    """The checkpoint Ray Train hands this attempt when it is complete; when
    it is not (its meta.json missing: a write cut short, a folder damaged
    since), the run's latest complete one, the same rule `sample`, `eval`,
    `export` and the data stream follow (checkpoint_source.latest_ray_checkpoint)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    meta = Path(checkpoint.path) / META_FILE
    if checkpoint.filesystem.get_file_info(str(meta)).type == pyarrow.fs.FileType.File:
        return checkpoint
    fallback = latest_ray_checkpoint(loop_config["run_folder"])
    if ray.train.get_context().get_world_rank() == 0:
        sys.stdout.write(f"checkpoint {checkpoint.path} is incomplete ({META_FILE} missing); "
                         f"resuming from {fallback}\n")
    return ray.train.Checkpoint(str(fallback))


def restore(model, optimizer, scaler, cfg: Config, loop_config: dict) -> LoopState:
    """Load the checkpoint this attempt resumes from, if any."""
    checkpoint = checkpoint_to_resume(loop_config)
    if checkpoint is None:
        return LoopState()
    with local_checkpoint_folder(checkpoint) as folder:
        model_state, meta = load_model_state(folder)
        check_resumable(meta, cfg.model.to_gpt_config(), cfg.train.global_batch_size,
                        loop_config["dataset"]["manifest_sha256"], f"{cfg.train.run_name} ({checkpoint.path})")
        train_state = load_train_state(folder)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(train_state["optimizer"])
    if scaler is not None and train_state["scaler"]:
        scaler.load_state_dict(train_state["scaler"])
    restore_rng_state(train_state["rng"])
    return LoopState(step=meta["step"], tokens_seen=meta["tokens_seen"],
                     nonfinite_steps=train_state["nonfinite_steps"])


# --- the loop ------------------------------------------------------------------


def train_worker(loop_config: dict) -> dict:
    """Entry point of each Ray Train worker (`TorchTrainer(train_worker, ...)`)."""
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_report_log()
    threads = set_cpu_threads(cfg)
    write_pid(loop_config.get("pid_dir"), rank)
    device = ray.train.torch.get_device()
    chunked_loss = resolve_chunked_loss(cfg.train.chunked_loss, device)
    precision, probe = resolve_precision(cfg.train.precision, device,
                                         lambda: probe_cpu_precision(cfg, rank, world, chunked_loss))
    if probe and rank == 0:
        sys.stdout.write(probe.summary() + "\n")  # not print(): see the progress line below
        sys.stdout.flush()
    accumulation = gradient_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)

    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model = GPT(cfg.model.to_gpt_config(), chunked_loss=chunked_loss).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
    state = restore(model, optimizer, scaler, cfg, loop_config)
    raw_model = model
    current_step = [state.step]
    poison_loss_from(raw_model, loop_config.get("test_hooks", {}), current_step)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    if cfg.train.compile:
        model = torch.compile(model)

    data = loop_config["dataset"]
    train_shards = [Shard(p, f, n) for p, f, n in data["train_shards"]]
    val_shards = [Shard(p, f, n) for p, f, n in data["val_shards"]]
    stream = open_train_stream(cfg, train_shards, rank, world)
    fpt = raw_model.flops_per_token()
    # MFU's denominator, all workers together. Measured at the first report,
    # not here: on a 2-core CPU the probe shares the cores with the start-up
    # of Ray Train's controller and read 10-20% below the quiet peak, which
    # inflated every MFU of the run.
    peak: float | None = None
    peak_rechecked = False
    tokens_per_step = cfg.train.global_batch_size * cfg.model.block_size
    is_ddp = world > 1

    loss_sum = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    last_val = float("nan")
    first_step_at, reported_once = None, False
    while state.step < cfg.train.max_steps:
        maybe_inject_fault(state.step, cfg, loop_config["fault_marker_dir"])
        current_step[0] = state.step
        lr = learning_rate(state.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_rows: list[int] = []

        def micro_batches():
            for rows, tokens in stream.micro_batches(state.step):
                step_rows.extend(rows.tolist())
                yield tokens

        step_loss, grad_norm, applied = optimizer_step(
            model, optimizer, scaler, micro_batches(), accumulation, precision, device,
            cfg.train.grad_clip, is_ddp)
        loss_sum += step_loss
        if first_step_at is None and window_steps == 0 and not reported_once:
            first_step_at = time.time()
        if applied:
            state.nonfinite_in_a_row = 0
        else:
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
        append_audit(loop_config.get("audit_dir"), state.step, rank, step_rows)
        state.step += 1
        state.tokens_seen += tokens_per_step
        window_steps += 1

        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            # Skipped steps never touched the weights: checkpoint the last good state.
            report({"step": state.step, "nonfinite_steps": state.nonfinite_steps}, True, rank,
                   raw_model, optimizer, scaler, state, cfg, stream, loop_config)
            raise NonFiniteLossError(
                f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped at step "
                f"{state.step}; the last good state is the latest checkpoint"
            )
        last = state.step == cfg.train.max_steps
        do_eval = state.step % cfg.train.eval_interval == 0 or last
        do_ckpt = state.step % cfg.train.checkpoint_interval == 0 or last
        if not (state.step % cfg.train.log_interval == 0 or do_eval or do_ckpt):
            if state.step == 1:  # a first progress line after one step, not after `log_interval`
                print_first_step(state.step, cfg, loss_sum, window_steps, window_start, tokens_per_step, lr, rank)
            continue

        # One host sync per report, not per step.
        elapsed = time.perf_counter() - window_start
        train_loss = all_reduce_mean(loss_sum.reshape(1) / window_steps)[0].item()
        tokens_per_s = window_steps * tokens_per_step / elapsed
        measure_peak = lambda: peak_flops(device, precision, cfg.train.cpu_peak_flops) * world
        peak = peak or measure_peak()
        recheck = not peak_rechecked and tokens_per_s * fpt > peak  # under-measured: see metrics.checked_peak
        if recheck:
            peak, peak_rechecked = checked_peak(peak, tokens_per_s * fpt, measure_peak), True
        metrics = {
            "step": state.step,
            "train/loss": train_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, fpt, peak),
            "step_time_ms": 1000 * elapsed / window_steps,
            "tokens_seen": state.tokens_seen,
            "epoch": state.step / stream.steps_per_epoch,
            "nonfinite_steps": state.nonfinite_steps,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if first_step_at is not None:  # the first report of this attempt
            metrics["time_to_first_step_s"] = first_step_at - loop_config["driver_start_time"]
            metrics["run_tags"] = {"gptdist.precision": precision, "gptdist.device": str(device),
                                   "gptdist.world_size": str(world), "gptdist.cpu_threads": str(threads),
                                   "gptdist.chunked_loss": str(raw_model.chunked_loss).lower(),
                                   # MFU's denominator, all workers together
                                   "gptdist.mfu_peak_tflops": f"{peak / 1e12:.3f}",
                                   # what this process's malloc was started with (trainer.WORKER_MALLOC_ENV)
                                   "gptdist.worker_keeps_freed_memory": str(os.environ.get("MALLOC_MMAP_MAX_") == "0").lower(),
                                   **(probe.tags() if probe else {})}
            first_step_at = None
        elif recheck:
            metrics["run_tags"] = {"gptdist.mfu_peak_tflops": f"{peak / 1e12:.3f}"}
        if device.type == "cuda":
            metrics["device_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if do_eval:
            last_val = evaluate(raw_model, val_shards, cfg, rank, world, device, precision)
            metrics["val/loss"] = last_val
            if rank == 0 and cfg.train.sample_tokens > 0:
                metrics["sample"] = training_sample(raw_model, cfg, device)
        if rank == 0:
            # Not print(): Ray Train patches it into a logger whose handlers
            # show each line twice on the driver.
            val = f"{last_val:.4f}" if math.isfinite(last_val) else "-"
            sys.stdout.write(progress_line(state.step, cfg.train.max_steps, train_loss, val, lr,
                                           metrics["step_time_ms"], tokens_per_s, metrics["mfu"]) + "\n")
            sys.stdout.flush()
        report(metrics, do_ckpt, rank, raw_model, optimizer, scaler, state, cfg, stream, loop_config)
        loss_sum.zero_()
        reported_once = True
        window_steps, window_start = 0, time.perf_counter()
    return {"step": state.step, "val_loss": last_val, "param_digests": gather_param_digests(raw_model, world)}


def progress_line(step: int, max_steps: int, loss: float, val: str, lr: float, step_ms: float,
                  tokens_per_s: float, mfu_value: float | None) -> str:
    """`step 10/60 | loss 6.1234 | val - | lr 9.09e-04 | 4,520 ms/step | 902 tok/s | mfu 28.0% | eta 3m46s`:
    the ETA at this window's step time."""
    eta_s = round((max_steps - step) * step_ms / 1000)
    eta = f"{eta_s // 3600}h{eta_s % 3600 // 60:02d}m" if eta_s >= 3600 else f"{eta_s // 60}m{eta_s % 60:02d}s"
    width = len(str(max_steps))
    mfu_text = "-" if mfu_value is None else f"{mfu_value:.1%}"
    return (f"step {step:>{width}}/{max_steps} | loss {loss:.4f} | val {val} | lr {lr:.2e} | {step_ms:,.0f} ms/step "
            f"| {tokens_per_s:,.0f} tok/s | mfu {mfu_text} | eta {eta}")


def print_first_step(step: int, cfg: Config, loss_sum: torch.Tensor, window_steps: int, window_start: float,
                     tokens_per_step: int, lr: float, rank: int) -> None:
    """The progress line of the run's first step, printed, not reported (the
    logging window goes on to the first report). Every rank calls it: the
    loss is averaged over ranks."""
    elapsed = time.perf_counter() - window_start
    loss = all_reduce_mean(loss_sum.reshape(1) / window_steps)[0].item()
    if rank == 0:
        sys.stdout.write(progress_line(step, cfg.train.max_steps, loss, "-", lr, 1000 * elapsed / window_steps,
                                       window_steps * tokens_per_step / elapsed, None) + "\n")
        sys.stdout.flush()


def gather_param_digests(model: torch.nn.Module, world: int) -> list[str]:
    """sha256 of every rank's parameters: DDP keeps them bit-identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [h.hexdigest()]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, h.hexdigest())
    return digests


def report(metrics, with_checkpoint, rank, model, optimizer, scaler, state, cfg, stream, loop_config) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), model, optimizer, scaler, state, cfg, stream, loop_config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state.step:08d}")
