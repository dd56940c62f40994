"""One optimizer step and what it needs: precision, AdamW, the learning-rate
schedule. Free of Ray, so the benchmark's plain loop and GPU runs use the
very same step as the Ray Train workers."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from gptdist.attention_probe import AttentionProbe
from gptdist.config import Config
from gptdist.precision_probe import ProbeResult


def resolve_precision(requested: str, device: torch.device,
                      probe_cpu: Callable[[], ProbeResult] | None = None) -> tuple[str, ProbeResult | None]:
    """(the precision to train in, the CPU probe's result when it decided).

    `auto`: bf16 autocast on GPUs that support it, else fp16 with a
    GradScaler; on a CPU what `probe_cpu` measured faster on the model's
    matmuls (gptdist.precision_probe: bf16 autocast only where it beats fp32
    by a margin), fp32 without a probe. A requested precision is used as it
    is and nothing is measured."""
    if requested != "auto":
        return requested, None
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    if probe_cpu is None:
        return "fp32", None
    result = probe_cpu()
    return result.precision, result


def resolve_attention(requested: str, device: torch.device,
                      probe_cpu: Callable[[], AttentionProbe] | None = None) -> tuple[str, AttentionProbe | None]:
    """(the attention to train with, the CPU probe's result when it decided).
    `auto`: SDPA's fused kernels on GPUs; on a CPU what `probe_cpu` measured
    faster (gptdist.attention_probe), SDPA without a probe. A requested kind
    is used as it is."""
    if requested != "auto":
        return requested, None
    if device.type == "cuda" or probe_cpu is None:
        return "sdpa", None
    result = probe_cpu()
    return result.attention, result


def resolve_chunked_loss(requested: bool | None, device: torch.device) -> bool:
    """None: the chunked head + loss on CPUs, where bench/ measured it (it
    removes the logits' memory traffic); the plain path on GPUs until it is
    measured there (`python -m bench.gpu --cases bf16:compile:ddp:64:chunked`)."""
    return device.type == "cpu" if requested is None else requested


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT): biases and
    LayerNorm gains are not decayed. The fused kernel on CUDA and on CPU
    (one pass over each parameter instead of a dozen elementwise ops; nanoGPT
    uses it on CUDA only, and its CPU loop is the bench baseline)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.train.learning_rate,
        betas=(cfg.train.beta1, cfg.train.beta2),
        fused=device.type in ("cuda", "cpu") if fused is None else fused,
    )


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_steps."""
    t = cfg.train
    decay_steps = t.lr_decay_steps or t.max_steps
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / (t.warmup_steps + 1)
    if step >= decay_steps:
        return t.min_lr
    ratio = (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def optimizer_step(model, optimizer, scaler, micro_batches, accumulation: int, precision: str,
                   device: torch.device, grad_clip: float, is_ddp: bool):
    """Forward/backward over the micro-batches, then clip and step.

    Gradients are all-reduced only on the last micro-step (`no_sync` on the
    others). Returns (summed loss as a device tensor, no host sync; the
    gradient norm tensor; whether the step was applied). A non-finite
    gradient skips the step; with fp16 the GradScaler makes that call.
    """
    loss_sum = torch.zeros((), device=device)
    for m, tokens in enumerate(micro_batches):
        tokens = tokens.to(device, non_blocking=True)
        sync = contextlib.nullcontext() if (not is_ddp or m == accumulation - 1) else model.no_sync()
        with sync, autocast_context(precision, device):
            _, loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss = loss / accumulation
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    applied = True
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    elif bool(torch.isfinite(grad_norm)):  # one host sync per step; the clip needs the norm anyway
        optimizer.step()
    else:
        applied = False
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, applied
