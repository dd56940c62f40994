"""The training loop: what runs in each Ray Train worker.

One worker is one DDP rank. It builds the GPT, restores the checkpoint Ray
Train hands it (after a worker failure or a restart of the whole run),
wraps the model with `ray.train.torch.prepare_model` (gloo on CPU, NCCL on
GPU) and trains on the rows `data_pipeline.stream` assigns to it, which Ray
Data reads for it (`data_pipeline.ingest`, from its dataset shard) unless
`data.ingest: direct`. What it is given is a `WorkerSpec`; at each report
(`Schedule`) all ranks call `ray.train.report` (a barrier) with the same
`StepReport` from their `MetricsWindow`; rank 0 also attaches a checkpoint.
Workers never talk to MLflow: the coordinator on the driver side logs what
they report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
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
from gptdist.attention_probe import AttentionProbe, AttentionShape, attention_cache_file, probe_attention
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
from gptdist.metrics_window import MetricsWindow, all_reduce_mean, print_line, report_line
from gptdist.model import GPT, compile_gpt
from gptdist.precision_probe import ProbeResult, cache_file, model_matmuls, probe_precision
from gptdist.tokenizer import EOT_TOKEN, decode, encode
from gptdist.train_step import (autocast_context, build_optimizer, learning_rate, optimizer_step, resolve_attention,
                                resolve_chunked_loss, resolve_precision)
from gptdist.worker_contract import WORKER_MALLOC_ENV, StepReport, WorkerSpec


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything a step changes, and what a checkpoint saves."""

    model: GPT  # the bare model (checkpoints, evaluation, samples)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    wrapped: torch.nn.Module | None = None  # DDP / torch.compile around `model`: what trains
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    nonfinite_steps: int = 0  # skipped in total
    nonfinite_in_a_row: int = 0

    def advance(self, applied: bool, tokens: int) -> None:
        self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
        self.nonfinite_steps += 0 if applied else 1
        self.step += 1
        self.tokens_seen += tokens


@dataclass(frozen=True)
class Due:
    report: bool
    eval: bool
    checkpoint: bool


@dataclass(frozen=True)
class Schedule:
    """When to report, evaluate and checkpoint: every interval and at the end."""

    max_steps: int
    log_interval: int
    eval_interval: int
    checkpoint_interval: int

    @classmethod
    def from_config(cls, cfg: Config) -> Schedule:
        t = cfg.train
        return cls(t.max_steps, t.log_interval, t.eval_interval, t.checkpoint_interval)

    def at(self, step: int) -> Due:
        last = step == self.max_steps
        evaluate = step % self.eval_interval == 0 or last
        checkpoint = step % self.checkpoint_interval == 0 or last
        return Due(step % self.log_interval == 0 or evaluate or checkpoint, evaluate, checkpoint)


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
    this model's matmuls, or reads its machine's cached figures; every rank
    trains in its choice."""
    matmuls = model_matmuls(cfg.model.to_gpt_config(), cfg.train.micro_batch_size, chunked_loss)
    return measured_on_rank0(lambda: probe_precision(matmuls, cache_file()), rank, world)


def probe_cpu_attention(cfg: Config, rank: int, world: int, precision: str) -> AttentionProbe:
    """`attention: auto` on CPU workers: rank 0 times SDPA against the
    matmuls on one layer at this run's shape and precision, or reads its
    machine's cached timings; every rank trains with its choice."""
    gpt = cfg.model.to_gpt_config()
    shape = AttentionShape(cfg.train.micro_batch_size, gpt.n_head, gpt.block_size, gpt.n_embd // gpt.n_head,
                           "bf16" if precision == "bf16" else "fp32")
    return measured_on_rank0(lambda: probe_attention(shape, attention_cache_file()), rank, world)


def measured_on_rank0(measure, rank: int, world: int):
    """`measure()` on rank 0, its result broadcast to every rank; the other
    ranks wait at the broadcast, leaving rank 0 the cores."""
    result = [measure() if rank == 0 else None]
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]


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


def write_checkpoint(folder: Path, state: TrainState, cfg: Config, stream: RayDataStream | TrainStream,
                     spec: WorkerSpec) -> None:
    train_state = {
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "rng": rng_state(),
        "nonfinite_steps": state.nonfinite_steps,
    }
    meta = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "data_position": stream.position(state.step),
        "global_batch_size": cfg.train.global_batch_size,
        "model": model_meta(cfg.model.to_gpt_config()),
        "dataset_manifest_sha256": spec.dataset.manifest_sha256,
        "data_path": spec.dataset.path,
        "mlflow_run_id": spec.mlflow_run_id,
        "config": cfg.to_dict(),
    }
    save_checkpoint(folder, clean_state_dict(state.model), train_state, meta,
                    before_meta=lambda: spec.hooks.while_checkpointing(state.step))


def send_report(report: StepReport, with_checkpoint: bool, rank: int, state: TrainState, cfg: Config,
                stream: RayDataStream | TrainStream, spec: WorkerSpec) -> float:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, and
    reports and returns the seconds it took to write (0 without one)."""
    if not (with_checkpoint and rank == 0):
        ray.train.report(report.to_ray())
        return 0.0
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_checkpoint(Path(tmp), state, cfg, stream, spec)
        report.metrics["checkpoint_save_s"] = time.perf_counter() - started
        ray.train.report(report.to_ray(), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state.step:08d}")
    return report.metrics["checkpoint_save_s"]


def checkpoint_to_resume(spec: WorkerSpec) -> ray.train.Checkpoint | None:
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
    fallback = latest_ray_checkpoint(spec.run_folder)
    if ray.train.get_context().get_world_rank() == 0:
        print_line(f"checkpoint {checkpoint.path} is incomplete ({META_FILE} missing); resuming from {fallback}")
    return ray.train.Checkpoint(str(fallback))


def restore(state: TrainState, cfg: Config, spec: WorkerSpec) -> None:
    """Load the checkpoint this attempt resumes from, if any, into `state`."""
    checkpoint = checkpoint_to_resume(spec)
    if checkpoint is None:
        return
    with local_checkpoint_folder(checkpoint) as folder:
        model_state, meta = load_model_state(folder)
        check_resumable(meta, cfg.model.to_gpt_config(), cfg.train.global_batch_size,
                        spec.dataset.manifest_sha256, f"{cfg.train.run_name} ({checkpoint.path})")
        train_state = load_train_state(folder)
    state.model.load_state_dict(model_state)
    state.optimizer.load_state_dict(train_state["optimizer"])
    if state.scaler is not None and train_state["scaler"]:
        state.scaler.load_state_dict(train_state["scaler"])
    restore_rng_state(train_state["rng"])
    state.step, state.tokens_seen = meta["step"], meta["tokens_seen"]
    state.nonfinite_steps = train_state["nonfinite_steps"]


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


# --- setting up a worker ---------------------------------------------------------


def build_state(cfg: Config, device: torch.device, precision: str, chunked_loss: bool,
                attention: str = "sdpa") -> TrainState:
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model = GPT(cfg.model.to_gpt_config(), chunked_loss=chunked_loss, attention=attention).to(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
    return TrainState(model, build_optimizer(model, cfg, device), scaler)


def wrap_model(state: TrainState, cfg: Config) -> None:
    state.wrapped = ray.train.torch.prepare_model(state.model)  # DDP when world > 1
    if cfg.train.compile:
        state.wrapped = compile_gpt(state.wrapped)


def run_facts(precision: str, attention: str, device: torch.device, world: int, threads: int, chunked_loss: bool,
              probe: ProbeResult | None, attention_probe: AttentionProbe | None) -> dict[str, str]:
    """What only a worker knows about the run (MLflow tags `gptdist.<name>`)."""
    return {"precision": precision, "attention": attention, "device": str(device), "world_size": str(world),
            "cpu_threads": str(threads),
            "chunked_loss": str(chunked_loss).lower(),
            # what this process's malloc was started with (worker_contract.WORKER_MALLOC_ENV)
            "worker_keeps_freed_memory": str(all(os.environ.get(k) == v for k, v in WORKER_MALLOC_ENV.items())).lower(),
            **(probe.facts() if probe else {}), **(attention_probe.facts() if attention_probe else {})}


def stop_if_diverged(state: TrainState, cfg: Config, rank: int, stream, spec: WorkerSpec) -> None:
    """After train.max_nonfinite_steps skipped steps in a row, checkpoint the
    last good state (skipped steps never touched the weights) and stop."""
    if state.nonfinite_in_a_row < cfg.train.max_nonfinite_steps:
        return
    send_report(StepReport(state.step, {"nonfinite_steps": state.nonfinite_steps}), True, rank, state, cfg,
                stream, spec)
    raise NonFiniteLossError(
        f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped at step "
        f"{state.step}; the last good state is the latest checkpoint")


# --- the loop ------------------------------------------------------------------


def train_worker(spec: WorkerSpec) -> dict:
    """Entry point of each Ray Train worker (`TorchTrainer(train_worker, ...)`)."""
    cfg = config_from_dict(spec.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_report_log()
    threads = set_cpu_threads(cfg)
    spec.hooks.on_start(rank)
    device = ray.train.torch.get_device()
    chunked_loss = resolve_chunked_loss(cfg.train.chunked_loss, device)
    precision, probe = resolve_precision(cfg.train.precision, device,
                                         lambda: probe_cpu_precision(cfg, rank, world, chunked_loss))
    attention, attention_probe = resolve_attention(cfg.train.attention, device,
                                                   lambda: probe_cpu_attention(cfg, rank, world, precision))
    for result in (probe, attention_probe):
        if result and rank == 0:
            print_line(result.summary())
    state = build_state(cfg, device, precision, chunked_loss, attention)
    restore(state, cfg, spec)
    spec.hooks.attach(state.model)
    wrap_model(state, cfg)
    stream = open_train_stream(cfg, spec.dataset.train_shards, rank, world)
    accumulation = gradient_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.block_size
    window = MetricsWindow(tokens_per_step=tokens_per_step, flops_per_token=state.model.flops_per_token(),
                           world=world, device=device, precision=precision, configured_peak=cfg.train.cpu_peak_flops)
    facts = run_facts(precision, attention, device, world, threads, state.model.chunked_loss, probe, attention_probe)
    schedule, last_val = Schedule.from_config(cfg), float("nan")

    while state.step < cfg.train.max_steps:
        spec.hooks.before_step(state.step, rank)
        lr = learning_rate(state.step, cfg)
        rows, loss, grad_norm, applied = train_step(state, stream, accumulation, lr, precision, device, cfg, world)
        spec.hooks.after_step(state.step, rank, rows)
        state.advance(applied, tokens_per_step)
        window.add(loss)
        stop_if_diverged(state, cfg, rank, stream, spec)
        due = schedule.at(state.step)
        if not due.report:
            line = window.first_step_line(state.step, cfg.train.max_steps, lr) if state.step == 1 else None
            if line and rank == 0:  # a first progress line after one step, not after `log_interval`
                print_line(line)
            continue
        report = window.close(state.step, lr, grad_norm, state.tokens_seen, state.step / stream.steps_per_epoch,
                              state.nonfinite_steps)
        first_step_at = window.take_first_step_time()
        if first_step_at is not None:  # the first report of this attempt
            report.metrics["time_to_first_step_s"] = first_step_at - spec.driver_start_time
            report.facts = {**facts, "mfu_peak_tflops": f"{window.peak / 1e12:.3f}", **report.facts}
        if due.eval:
            eval_started = time.perf_counter()
            last_val = report.metrics["val/loss"] = evaluate(state.model, spec.dataset.val_shards, cfg, rank, world,
                                                             device, precision)
            if rank == 0 and cfg.train.sample_tokens > 0:
                report.sample = training_sample(state.model, cfg, device)
            report.metrics["eval_s"] = time.perf_counter() - eval_started
            window.exclude(report.metrics["eval_s"])
        if rank == 0:
            print_line(report_line(report, cfg.train.max_steps, last_val, window.outside_ms_per_step()))
        window.exclude(send_report(report, due.checkpoint, rank, state, cfg, stream, spec))
    return {"step": state.step, "val_loss": last_val, "param_digests": gather_param_digests(state.model, world)}


def train_step(state: TrainState, stream, accumulation: int, lr: float, precision: str, device, cfg: Config,
               world: int) -> tuple[list[int], torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches of the step: the
    rows it trained, the loss (a device tensor), the gradient norm, and
    whether the update was applied (not skipped for a non-finite value)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    rows: list[int] = []

    def micro_batches():
        for indices, tokens in stream.micro_batches(state.step):
            rows.extend(indices.tolist())
            yield tokens

    loss, grad_norm, applied = optimizer_step(state.wrapped, state.optimizer, state.scaler, micro_batches(),
                                              accumulation, precision, device, cfg.train.grad_clip, world > 1)
    return rows, loss, grad_norm, applied
