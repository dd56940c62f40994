"""MFU and its denominator."""

from __future__ import annotations

import math

from gptdist.metrics import checked_peak, mfu


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
