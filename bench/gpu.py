"""GPU benchmark: GPT-2 124M, block 512, on one CUDA device.

Runs the very optimizer step the Ray Train workers run
(`gptdist.train_step.optimizer_step`), wrapped in NCCL DDP (world size 1),
in each precision path (bf16 autocast, fp16 autocast + GradScaler, fp32/TF32),
with and without `torch.compile`, and reports tokens/s, MFU against the
device's datasheet peak and peak device memory. Ray itself is not needed
here, so the figure isolates the model and step.

    python -m bench.gpu --out bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptdist.config import load_config
from gptdist.metrics import gpu_peak_flops, mfu
from gptdist.model import GPT, compile_gpt, preset
from gptdist.train_step import build_optimizer, optimizer_step


def init_nccl() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=0, world_size=1)


def run_case(precision: str, compile_model: bool, micro_batch: int, steps: int, warmup: int, ddp: bool,
             compile_mode: str | None = None, chunked_loss: bool = False) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(overrides=["model.preset=gpt2", "model.block_size=512", "model.dropout=0.0"])
    model = GPT(preset("gpt2", block_size=512), chunked_loss=chunked_loss).to(device)
    fpt = model.flops_per_token()
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    wrapped = DistributedDataParallel(model, device_ids=[0]) if ddp else model
    if compile_model:
        wrapped = compile_gpt(wrapped, mode=compile_mode)
    torch.cuda.reset_peak_memory_stats()
    data = torch.randint(0, 50257, (steps + warmup, micro_batch, 513), device=device)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _, _ = optimizer_step(wrapped, optimizer, scaler, [data[i]], 1, precision, device, 1.0, is_ddp=False)
        losses.append(loss)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    profile = profile_steps(wrapped, optimizer, scaler, data[:3], precision, device) if PROFILE else None
    tokens_per_s = steps * micro_batch * 512 / elapsed
    peak = gpu_peak_flops(torch.cuda.get_device_name(0), precision)
    result = {
        "precision": precision,
        "compile": compile_model,
        "ddp_nccl": ddp,
        "micro_batch": micro_batch,
        "compile_mode": compile_mode,
        "chunked_loss": chunked_loss,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": mfu(tokens_per_s, fpt, peak) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "profile_top_kernels": profile,
    }
    del model, wrapped, optimizer, data
    torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


PROFILE = False


def profile_steps(model, optimizer, scaler, batches, precision, device) -> list[dict]:
    """Where the GPU time of a step goes: the top kernels by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            optimizer_step(model, optimizer, scaler, [batch], 1, precision, device, 1.0, is_ddp=False)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1
    return [{"kernel": e.key[:90], "share": e.device_time_total / total, "calls": e.count} for e in events[:15]]


def main() -> None:
    global PROFILE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--cases",
        default="bf16:compile:ddp:32,bf16:eager:ddp:32,fp16:compile:ddp:32,fp32:compile:ddp:32",
        help="comma-separated precision:compile|eager|autotune:ddp|single:micro_batch[:chunked]",
    )
    parser.add_argument("--profile", action="store_true", help="add the top kernels of each case")
    args = parser.parse_args()
    PROFILE = args.profile
    init_nccl()
    results = []
    for case in args.cases.split(","):
        precision, mode, wrap, micro, *loss = case.split(":")
        try:
            results.append(run_case(precision, mode != "eager", int(micro), args.steps, 10, wrap == "ddp",
                                    "max-autotune-no-cudagraphs" if mode == "autotune" else None,
                                    chunked_loss=loss == ["chunked"]))
        except Exception as e:  # record, keep measuring the others
            results.append({"case": case, "error": repr(e)})
            print(results[-1], flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": "gpt2 (124M, 12L/12H/768, block 512, tied head, vocab 50304)",
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
