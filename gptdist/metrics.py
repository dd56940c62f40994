"""Throughput and model-FLOPs utilisation, computed in one place."""

from __future__ import annotations

import re
import time
from typing import Callable

import torch

# Dense (no sparsity) peak FLOP/s per device, by model name as it appears
# as a word in the CUDA device name ("NVIDIA L40S", "NVIDIA H100 80GB HBM3"),
# for bf16/fp16 tensor cores; fp32 runs use TF32 figures.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "A10G": {"bf16": 125e12, "fp32": 62.5e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 65e12, "fp32": 8.1e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
}


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    key = "fp32" if precision == "fp32" else "bf16"
    for name, peaks in GPU_PEAK_FLOPS.items():
        # A whole word, not a substring: "L4" must not match "NVIDIA L40S".
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", device_name):
            return peaks[key]
    return None


def measure_cpu_peak_flops(precision: str, size: int = 2048, seconds: float = 0.25, trials: int = 6,
                           shape: tuple[int, int, int] | None = None) -> float:
    """Matmul FLOP/s of this process with its current torch thread count: the
    denominator of MFU on a CPU, where no datasheet figure applies. Square
    `size` matrices, or an (m, k, n) `shape`.

    The best of `trials` timings of `seconds` each: a Ray worker probes while
    its controller and Ray Data are still starting, and a single timing there
    read half the true peak (so MFU read over 100%)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = shape or (size, size, size)
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, precision: str, configured: float | None = None) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        found = gpu_peak_flops(torch.cuda.get_device_name(device), precision)
        if found:
            return found
    return measure_cpu_peak_flops(precision) if device.type == "cpu" else float("nan")


def checked_peak(peak_flops_total: float, achieved_flops: float, remeasure: Callable[[], float]) -> float:
    """The MFU denominator, checked against what training achieved.

    Training cannot outrun the peak, so achieved FLOP/s above it means the
    peak was under-measured: a CPU probe shares the cores with whatever else
    starts up or runs on the machine (one read a bf16 peak of 117 GFLOP/s
    and put MFU at 85%). Then the peak is measured again and the higher of
    the two kept. The caller re-measures at most once per attempt; `mfu` caps
    what is left as the last guard."""
    if achieved_flops <= peak_flops_total:
        return peak_flops_total
    return max(peak_flops_total, remeasure())


def mfu(tokens_per_s: float, flops_per_token: int, peak_flops_total: float) -> float:
    """Model FLOPs utilisation (PaLM): achieved training FLOP/s over peak,
    never above 1.0 (an MFU over 100% only says the peak was under-measured;
    see `checked_peak`)."""
    value = tokens_per_s * flops_per_token / peak_flops_total
    return 1.0 if value > 1.0 else value  # NaN (no known peak) stays NaN
