"""MFU and its denominator."""

from __future__ import annotations

import math

from gptdist.metrics import checked_peak, mfu


def cpu_window():
    """A metrics window of a 1-worker fp32 CPU run, 1,000 tokens a step."""
    import torch

    from gptdist.metrics_window import MetricsWindow

    return MetricsWindow(tokens_per_step=1000, flops_per_token=10**6, world=1, device=torch.device("cpu"),
                         precision="fp32", configured_peak=1e10)


def test_mfu_never_exceeds_one():
    assert mfu(1000, 10**8, 2e11) == 0.5
    assert mfu(1000, 10**9, 2e11) == 1.0
    assert math.isnan(mfu(1000, 10**8, float("nan")))  # a GPU without a known peak


def test_an_outrun_peak_is_measured_again_and_the_higher_kept():
    calls = []

    def remeasure():
        calls.append(1)
        return 3e11

    assert checked_peak(2e11, 1.5e11, remeasure) == 2e11 and not calls
    assert checked_peak(2e11, 2.5e11, remeasure) == 3e11 and len(calls) == 1
    assert checked_peak(2e11, 2.5e11, lambda: 1e11) == 2e11  # a busier second probe does not lower it


def test_gpu_peaks_match_the_model_name_as_a_word():
    from gptdist.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12  # not the L4's 121
    assert gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert gpu_peak_flops("NVIDIA A10G", "bf16") == 125e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", "bf16") == 165e12
    assert gpu_peak_flops("NVIDIA B200", "bf16") is None


def test_evaluation_and_checkpoint_time_is_not_step_time(monkeypatch):
    """A window after an eval reports the steps' own time; the ETA counts
    the eval and checkpoint time per step so far."""
    import torch

    from gptdist import metrics_window
    from gptdist.metrics_window import report_line

    clock = [0.0]
    monkeypatch.setattr(metrics_window.time, "perf_counter", lambda: clock[0])
    window = cpu_window()

    def steps(n: int, seconds_each: float):
        for _ in range(n):
            clock[0] += seconds_each
            window.add(torch.tensor(2.0))

    steps(10, 1.0)
    first = window.close(10, 1e-3, 0.5, 10_000, 0.1, 0)
    assert first.metrics["step_time_ms"] == 1000 and first.metrics["tokens_per_s"] == 1000
    clock[0] += 6.0  # an evaluation and a sample
    window.exclude(6.0)
    clock[0] += 4.0  # a checkpoint written
    window.exclude(4.0)
    steps(10, 1.0)
    second = window.close(20, 1e-3, 0.5, 20_000, 0.2, 0)
    assert second.metrics["step_time_ms"] == 1000 and second.metrics["tokens_per_s"] == 1000
    assert second.metrics["mfu"] == 0.1
    # 10 s outside 20 steps: 0.5 s a step on top of the steps' 1 s for the 40 steps left
    assert window.outside_ms_per_step() == 500
    assert report_line(second, 60, float("nan"), window.outside_ms_per_step()).endswith("eta 1m00s")


def touch_fresh_memory(size: int) -> None:
    """Map `size` bytes afresh from the kernel, write every 4 KB page, unmap.
    (An mmap of its own, not malloc: in a process that has run other tests
    malloc may serve the memory from what it kept.)"""
    import mmap

    import numpy as np

    fresh = mmap.mmap(-1, size)
    pages = np.frombuffer(fresh, dtype=np.uint8)
    pages[::4096] = 1
    del pages
    fresh.close()


def test_window_reports_the_page_faults_of_its_steps():
    """Each step below maps 64 MB afresh from the kernel and writes every
    page of it: the window reports at least one fault per page touched,
    16,384 pages of 4 KB, or 32 of 2 MB where the kernel backs them with
    transparent huge pages."""
    import torch

    size = 64 * 2**20
    window = cpu_window()
    for _ in range(3):
        touch_fresh_memory(size)
        window.add(torch.tensor(2.0))
    faults = window.close(3, 1e-3, 0.5, 3000, 0.1, 0).metrics["worker_page_faults_per_step"]
    assert faults >= size / (2 * 2**20)


def test_page_faults_of_excluded_work_are_not_the_steps():
    """An evaluation between two windows maps 512 MB (at least 256 faults,
    85 a step over the 3 steps below); the steps after it touch no fresh
    memory, and their window does not count the evaluation's faults."""
    import torch

    window = cpu_window()
    window.add(torch.tensor(2.0))
    window.close(1, 1e-3, 0.5, 1000, 0.1, 0)
    touch_fresh_memory(512 * 2**20)  # the evaluation
    window.exclude(1.0)
    for _ in range(3):
        window.add(torch.tensor(2.0))
    faults = window.close(4, 1e-3, 0.5, 4000, 0.1, 0).metrics["worker_page_faults_per_step"]
    assert faults < 32
