"""The logging window of a training worker: what happened between two
reports (loss, step time, tokens/s, MFU, memory), turned into one
`StepReport` and one progress line."""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.distributed as dist

from gptdist.metrics import checked_peak, mfu, peak_flops
from gptdist.worker_contract import StepReport


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def page_faults() -> int:
    """Page faults of this process so far, all threads: each maps a fresh
    page (zeroed memory, or a file page from the cache) of 4 KB, or 2 MB
    where the kernel backs memory with transparent huge pages."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


class MetricsWindow:
    """Steps since the last report. `add` each step's loss (a device
    tensor: one host sync per report, not per step); `close` at a report.
    Every rank calls `close` and `first_step_line` (they average the loss
    over ranks). Evaluation, samples and checkpoint writing are not steps:
    `exclude` leaves their time out of step time, tokens/s and MFU (else the
    window after each eval read a third slower) and spreads it over the ETA."""

    def __init__(self, *, tokens_per_step: int, flops_per_token: int, world: int, device: torch.device,
                 precision: str, configured_peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.measure_peak = lambda: peak_flops(device, precision, configured_peak) * world
        # MFU's denominator, all workers together. Measured at the first report,
        # not at start-up: a probe then shares the cores with Ray Train's
        # controller starting and reads low (see metrics.checked_peak).
        self.peak: float | None = None
        self.peak_rechecked = False
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()
        self.faults_at_start = page_faults()
        self.steps_total, self.outside_s = 0, 0.0  # this attempt's steps, and its time outside them
        self.first_step_at: float | None = None  # wall time of this attempt's first step, until reported
        self.reported = False

    def add(self, step_loss: torch.Tensor) -> None:
        if not self.reported and self.first_step_at is None:
            self.first_step_at = time.time()
        self.loss_sum += step_loss
        self.steps += 1
        self.steps_total += 1

    def exclude(self, seconds: float) -> None:
        """`seconds` just spent on work that is not a training step. Before
        the window's first step its page faults start counting afresh, so an
        evaluation's or checkpoint's memory is not counted as the steps'."""
        self.started += seconds
        self.outside_s += seconds
        if self.steps == 0:
            self.faults_at_start = page_faults()

    def outside_ms_per_step(self) -> float:
        """Evaluation and checkpoint time so far, per step: the ETA's share of it."""
        return 1000 * self.outside_s / max(1, self.steps_total)

    def mean_loss(self) -> float:
        return all_reduce_mean(self.loss_sum.reshape(1) / self.steps)[0].item()

    def close(self, step: int, lr: float, grad_norm: float, tokens_seen: int, epoch: float,
              nonfinite_steps: int) -> StepReport:
        """The window's report; the next window starts now. A peak found
        under-measured (training outran it) is re-measured once and re-sent."""
        elapsed = time.perf_counter() - self.started
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        self.peak = self.peak or self.measure_peak()
        facts = {}
        if not self.peak_rechecked and tokens_per_s * self.flops_per_token > self.peak:
            self.peak, self.peak_rechecked = checked_peak(self.peak, tokens_per_s * self.flops_per_token,
                                                          self.measure_peak), True
            facts["mfu_peak_tflops"] = f"{self.peak / 1e12:.3f}"
        metrics = {
            "train/loss": self.mean_loss(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak),
            "step_time_ms": 1000 * elapsed / self.steps,
            "tokens_seen": tokens_seen,
            "epoch": epoch,
            "nonfinite_steps": nonfinite_steps,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # Memory the worker's malloc handed back and took again: near 0 once
            # warm when it keeps freed memory (worker_contract.WORKER_MALLOC_ENV).
            "worker_page_faults_per_step": (page_faults() - self.faults_at_start) / self.steps,
        }
        if self.device.type == "cuda":
            metrics["device_peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.loss_sum.zero_()
        self.steps, self.started, self.reported = 0, time.perf_counter(), True
        self.faults_at_start = page_faults()
        return StepReport(step, metrics, facts)

    def take_first_step_time(self) -> float | None:
        """Wall time of this attempt's first step, once (for its first report)."""
        first, self.first_step_at = self.first_step_at, None
        return first

    def first_step_line(self, step: int, max_steps: int, lr: float) -> str:
        """The progress line of the run's first step, printed, not reported
        (the window goes on to the first report)."""
        elapsed = time.perf_counter() - self.started
        return progress_line(step, max_steps, self.mean_loss(), "-", lr, 1000 * elapsed / self.steps,
                             self.steps * self.tokens_per_step / elapsed, None)


def progress_line(step: int, max_steps: int, loss: float, val: str, lr: float, step_ms: float,
                  tokens_per_s: float, mfu_value: float | None, outside_ms_per_step: float = 0.0) -> str:
    """`step 10/60 | loss 6.1234 | val - | lr 9.09e-04 | 4,520 ms/step | 902 tok/s | mfu 28.0% | eta 3m46s`:
    the ETA at this window's step time plus the evaluation and checkpoint
    time per step so far."""
    eta_s = round((max_steps - step) * (step_ms + outside_ms_per_step) / 1000)
    eta = f"{eta_s // 3600}h{eta_s % 3600 // 60:02d}m" if eta_s >= 3600 else f"{eta_s // 60}m{eta_s % 60:02d}s"
    width = len(str(max_steps))
    mfu_text = "-" if mfu_value is None else f"{mfu_value:.1%}"
    return (f"step {step:>{width}}/{max_steps} | loss {loss:.4f} | val {val} | lr {lr:.2e} | {step_ms:,.0f} ms/step "
            f"| {tokens_per_s:,.0f} tok/s | mfu {mfu_text} | eta {eta}")


def report_line(report: StepReport, max_steps: int, last_val: float, outside_ms_per_step: float = 0.0) -> str:
    m = report.metrics
    val = f"{last_val:.4f}" if math.isfinite(last_val) else "-"
    return progress_line(report.step, max_steps, m["train/loss"], val, m["lr"], m["step_time_ms"],
                         m["tokens_per_s"], m["mfu"], outside_ms_per_step)


def print_line(line: str) -> None:
    """Not print(): Ray Train patches print in its workers into a logger
    whose handlers show each line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
