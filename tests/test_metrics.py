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
