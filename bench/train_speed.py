"""Training speed on this machine: a plain single-process PyTorch loop (how
nanoGPT trains on a CPU) against `gptdist train` under Ray, same model, same
batch, same run, so the ratio is honest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from gptdist.config import load_config
from gptdist.driver import WORKER_MALLOC_ENV
from gptdist.metrics import measure_cpu_peak_flops
from gptdist.model import GPT, compile_gpt, preset
from gptdist.precision_probe import Matmul, ProbeResult, probe_precision
from gptdist.train_step import build_optimizer, optimizer_step

BATCH, BLOCK = 8, 512


def matmul_peaks(threads: int, fast_bf16: bool = True) -> dict[str, float]:
    """The MFU denominators (large square matmuls), and for comparison the
    same precisions on the model's own QKV shape (batch 8x512 rows, 384 ->
    1152), where AMX runs faster than on the squares. Without bf16
    instructions one bf16 timing of a smaller square says how slow the
    emulation is (a 2048^2 product takes many seconds there)."""
    torch.set_num_threads(1)
    one_thread = measure_cpu_peak_flops("fp32", size=2048, seconds=0.5, trials=6)
    torch.set_num_threads(threads)
    peaks = {"fp32": measure_cpu_peak_flops("fp32", size=2048, seconds=0.5, trials=10),
             # How the cores add up: two vCPUs gave 1.9-2x one on a quiet
             # VM, 1.2-1.4x on a busy host.
             "fp32_1thread": one_thread,
             "fp32_qkv_shape": measure_cpu_peak_flops("fp32", shape=(BATCH * BLOCK, 384, 1152), seconds=0.5, trials=6)}
    if fast_bf16:
        peaks["bf16"] = measure_cpu_peak_flops("bf16", size=2048, seconds=0.5, trials=10)
        peaks["bf16_qkv_shape"] = measure_cpu_peak_flops("bf16", shape=(BATCH * BLOCK, 384, 1152), seconds=0.5, trials=6)
    else:
        peaks["bf16"] = measure_cpu_peak_flops("bf16", size=512, seconds=0.5, trials=1)
    return peaks


def plain_step(preset_name: str, batches: int, precision: str = "fp32", compile_model: bool = False):
    """The model and a function running the plain loop's step on synthetic
    batch i of `batches`, as nanoGPT trains on a CPU: the plain head and
    F.cross_entropy, AdamW's for-loop kernel (nanoGPT fuses it on CUDA only),
    the same optimizer step."""
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"model.preset={preset_name}"])
    model = GPT(preset(preset_name, block_size=BLOCK))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), fused=False)
    step_model = compile_gpt(model) if compile_model else model
    data = torch.randint(0, 50257, (batches, BATCH, BLOCK + 1))

    def step(i: int) -> torch.Tensor:
        loss, _, _ = optimizer_step(step_model, optimizer, None, [data[i]], 1, precision,
                                    torch.device("cpu"), 1.0, is_ddp=False)
        return loss

    return model, step


def plain_loop(preset_name: str, steps: int, warmup: int, precision: str = "fp32", compile_model: bool = False,
               threads: int | None = None) -> dict:
    """`plain_step` timed: single process, no Ray."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, step = plain_step(preset_name, warmup + steps, precision, compile_model)
    times, losses = [], []
    compile_start = time.perf_counter()
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(float(step(i)))
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[warmup:])
    return {
        "tokens_per_s": BATCH * BLOCK / steady,
        "flops_per_token": model.flops_per_token(),
        "warmup_s": sum(times[:warmup]) if compile_model else None,
        "total_s": time.perf_counter() - compile_start,
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def plain_loop_in_child(*args, **kwargs) -> dict:
    """`plain_loop` in a fresh process: its full-logits step peaks at about
    4 GB, which would otherwise count as the driver's peak RSS below."""
    return in_child(plain_loop, *args, **kwargs)


def probe_precision_on_threads(matmuls: list[Matmul], threads: int) -> ProbeResult:
    """The precision probe, uncached, on `threads` torch threads: for
    in_child, which pickles the function by its module's name."""
    torch.set_num_threads(threads)
    return probe_precision(matmuls, cache=None)


def in_child(fn, *args, worker_malloc: bool = False, **kwargs):
    """`fn(*args, **kwargs)` in a fresh spawned process; with `worker_malloc`
    the process starts with the training workers' malloc settings (glibc
    reads them at start): without them a step that allocates large temporaries
    each call, such as the matmul attention's T x T scores, page-faults them
    anew and reads up to 2x slower than in a worker."""
    spawn = multiprocessing.get_context("spawn")
    with (environment(WORKER_MALLOC_ENV if worker_malloc else {}),
          concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool):
        return pool.submit(fn, *args, **kwargs).result()


@contextlib.contextmanager
def environment(extra: dict[str, str]):
    """os.environ with `extra` added while the block runs: processes started
    in it inherit them (glibc reads its malloc settings when a process starts)."""
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def step_server(conn, kind: str, preset_name: str, batches: int, threads: int) -> None:
    """A child process holding one step, `plain` (the plain loop's) or
    `gptdist` (the workers': chunked loss, fused AdamW), that answers
    "ready" once built, then times one step for each request until sent
    False."""
    torch.set_num_threads(threads)
    if kind == "plain":
        _, step = plain_step(preset_name, batches)
    else:
        from bench.cpu_profile import worker_step  # it imports this module

        _, step = worker_step(preset_name, "fp32", batches)
    conn.send("ready")
    i = 0
    while conn.recv():
        start = time.perf_counter()
        step(i % batches)
        conn.send(time.perf_counter() - start)
        i += 1


def alternating_steps(preset_name: str, rounds: int, warmup: int = 1) -> dict:
    """The plain loop's fp32 step against gptdist's, each in a process of its
    own, no Ray, taking turns one step at a time, the order swapped each
    round. Neighbouring steps see the same machine, so their ratio holds
    while a shared VM's speed drifts: one VM's pairs of whole runs, minutes
    apart, read 0.73x and 0.94x while the workers' own MFU, against peaks
    probed beside them, read 80% and 78%.

    Both processes start with the workers' malloc settings, so the ratio is
    the step code's own gain (chunked loss, fused AdamW, attention choice).
    The plain loop with glibc's default malloc faults its 4 GB of fresh
    temporaries in every step, and taking turns with a process that keeps its
    memory slowed that step by a fifth or more on a 2-core VM (8.2-10.9
    against 6.0-7.8 s/step alone, the same hour), which made the row read
    1.7-1.8x where whole runs read 1.1x. What the malloc settings give the
    plain loop is the continuous `plain_loop_in_child(..., worker_malloc=True)`
    row; what Ray adds around the step is `bench.ray_cost`'s measurement."""
    spawn = multiprocessing.get_context("spawn")
    threads = os.cpu_count() or 1
    servers = {}
    with environment(WORKER_MALLOC_ENV):
        for kind in ("plain", "gptdist"):
            parent, child = spawn.Pipe()
            process = spawn.Process(target=step_server, args=(child, kind, preset_name, warmup + rounds, threads),
                                    daemon=True)
            process.start()
            servers[kind] = (parent, process)
    try:
        for parent, _ in servers.values():
            if parent.recv() != "ready":
                raise RuntimeError("a step process failed to start")

        def timed(kind: str) -> float:
            servers[kind][0].send(True)
            return servers[kind][0].recv()

        for _ in range(warmup):
            timed("plain"), timed("gptdist")
        times: dict[str, list[float]] = {"plain": [], "gptdist": []}
        for r in range(rounds):
            for kind in (("plain", "gptdist") if r % 2 == 0 else ("gptdist", "plain")):
                times[kind].append(timed(kind))
    finally:
        for parent, process in servers.values():
            try:
                parent.send(False)
            except OSError:
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return turns_summary(times)


def turns_summary(times: dict[str, list[float]]) -> dict:
    """Step times of the two processes, round by round, as speeds and the
    median of each round's ratio (plain step time over gptdist's)."""
    ratios = [p / g for p, g in zip(times["plain"], times["gptdist"])]
    return {
        "plain_tokens_per_s": BATCH * BLOCK / statistics.median(times["plain"]),
        "gptdist_tokens_per_s": BATCH * BLOCK / statistics.median(times["gptdist"]),
        "ratios": ratios, "ratio": statistics.median(ratios), "step_times_s": times,
    }


def gptdist_run(preset_name: str, steps: int, data_path: str, *overrides: str) -> dict:
    """`gptdist train` on the running Ray; tokens/s is the median of the
    reported windows after the first (which holds start-up and compile)."""
    from gptdist.driver import train_main

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cfg = load_config(overrides=[
            f"model.preset={preset_name}", f"model.block_size={BLOCK}", f"data.path={data_path}",
            f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}", f"train.max_steps={steps}",
            "train.log_interval=1", f"train.eval_interval={steps}", "train.eval_batches=1",
            f"train.checkpoint_interval={steps}", "train.sample_tokens=0", f"ray.storage_path={tmp}/ray",
            f"tracking.uri={uri}", f"tracking.runs_dir={tmp}", "tracking.log_checkpoints=none", *overrides,
        ])
        start = time.perf_counter()
        summary = train_main(cfg)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        run_id = summary["mlflow_run_id"]
        history = lambda key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        tps = history("tokens_per_s")
        first_step_s = history("time_to_first_step_s")
        tags = client.get_run(run_id).data.tags
        return {
            "precision": tags.get("gptdist.precision"),  # what `auto` chose, or the setting
            "attention": tags.get("gptdist.attention"),
            "tokens_per_s": statistics.median(tps[2:] if len(tps) > 3 else tps[1:]),
            "mfu_reported": statistics.median(history("mfu")[2:] or history("mfu")),
            "losses": history("train/loss"),
            "wall_s": wall,
            "time_to_first_step_s": first_step_s[0] if first_step_s else None,
            "worker_peak_rss_mb": max(history("worker_peak_rss_mb") or [0]),
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def ensure_shakespeare(root: Path) -> str:
    from data_pipeline.prepare import prepare_dataset

    out = root / "shakespeare-512"
    prepare_dataset(["shakespeare"], out, block_size=BLOCK)
    return str(out)
