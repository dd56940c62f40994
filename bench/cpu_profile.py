"""`python -m bench.cpu_profile [--preset mini] [--precision fp32]`: where one
CPU training step's time goes, by kind of work, in one process (the step
the Ray Train workers run: chunked loss, fused AdamW; no Ray).

Writes bench/results/<date>-<host>-<cpu kind>-<preset>-<precision>-profile.json
and prints a table. It runs under the workers' malloc settings
(gptdist.worker_contract.WORKER_MALLOC_ENV), restarting itself with them where they
are not set, to see the step as a worker runs it (`--system-malloc` keeps
glibc's defaults); the file records which."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.__main__ import machine_record, result_path
from bench.train_speed import BATCH, BLOCK
from gptdist.attention_probe import AttentionShape, attention_cache_file, probe_attention
from gptdist.config import load_config
from gptdist.driver import WORKER_MALLOC_ENV
from gptdist.model import GPT, preset
from gptdist.train_step import build_optimizer, optimizer_step


def kind_of(op: str, shapes: list, vocab: int) -> str:
    """The kind of work of one profiled op (self time, so nothing counts twice)."""
    lists = [s for s in shapes if isinstance(s, list)]
    if op in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data") and not any(
            vocab in s for s in lists):
        return "attention (matmul path)"  # model.matmul_attention's products and softmax
    if op in ("aten::mm", "aten::addmm", "aten::addmm_"):
        return "LM head matmuls" if any(vocab in s for s in shapes if isinstance(s, list)) else "block matmuls"
    if "scaled_dot_product" in op:
        return "attention (SDPA)"
    if op in ("aten::_softmax", "aten::_log_softmax"):
        return "softmax over the vocabulary"
    if "adam" in op:
        return "AdamW"
    if "gelu" in op:
        return "GELU"
    if "layer_norm" in op:
        return "LayerNorm"
    if "embedding" in op:
        return "embeddings"
    return "other (copies, adds, fills, norms)"


def worker_step(preset_name: str, precision: str, batches: int) -> tuple[GPT, Callable[[int], None]]:
    """The model and a function running the workers' CPU step (chunked loss,
    fused AdamW, the attention `train.attention: auto` picks) on synthetic
    batch i of `batches`."""
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"model.preset={preset_name}"])
    config = preset(preset_name, block_size=BLOCK)
    # The attention `auto` trains with here (the probe's cached choice, else measured).
    shape = AttentionShape(BATCH, config.n_head, BLOCK, config.n_embd // config.n_head, precision)
    model = GPT(config, chunked_loss=True, attention=probe_attention(shape, attention_cache_file()).attention)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    data = torch.randint(0, 50257, (batches, BATCH, BLOCK + 1))

    def step(i: int) -> None:
        optimizer_step(model, optimizer, None, [data[i]], 1, precision, torch.device("cpu"), 1.0, is_ddp=False)

    return model, step


def profile_step(preset_name: str, precision: str, steps: int = 4) -> dict:
    model, step = worker_step(preset_name, precision, steps + 3)
    step(0)  # warm-up: allocations, oneDNN kernels
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(steps + 1)
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::") or "adam" in event.key:
            kinds[kind_of(event.key, event.input_shapes, model.config.vocab_size)] += event.self_cpu_time_total
    total = sum(kinds.values())
    step_s = statistics.median(times)
    return {
        "preset": preset_name, "precision": precision, "attention": model.transformer.h[0].attn.attention,
        "batch": [BATCH, BLOCK],
        "threads": torch.get_num_threads(),
        "step_s": step_s, "tokens_per_s": BATCH * BLOCK / step_s,
        "model_flops_per_s": BATCH * BLOCK / step_s * model.flops_per_token(),
        "shares": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def worker_malloc_set() -> bool:
    return all(os.environ.get(k) == v for k, v in WORKER_MALLOC_ENV.items())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--system-malloc", action="store_true",
                        help="glibc's default malloc settings instead of the training workers'")
    args = parser.parse_args()
    if not args.system_malloc and not worker_malloc_set():
        # glibc reads its malloc settings only when a process starts.
        os.execve(sys.executable, [sys.executable, "-m", "bench.cpu_profile", *sys.argv[1:]],
                  {**os.environ, **WORKER_MALLOC_ENV})
    torch.set_num_threads(os.cpu_count() or 1)
    result = profile_step(args.preset, args.precision)
    report = {**machine_record(), "torch": torch.__version__,
              "worker_malloc_settings": worker_malloc_set(),
              **result}
    out = result_path(f"-{args.preset}-{args.precision}-profile")
    out.write_text(json.dumps(report, indent=2))
    print(f"{args.preset} {args.precision}: {result['step_s']:.2f} s/step, {result['tokens_per_s']:,.0f} tok/s, "
          f"{result['model_flops_per_s'] / 1e9:.0f} GFLOP/s")
    print("| kind of work | share of the step |\n|---|---|")
    for kind, share in result["shares"].items():
        print(f"| {kind} | {share:.1%} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
