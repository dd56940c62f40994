"""`train.precision: auto` on a CPU: measured, cached per machine, tagged."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from gptdist import precision_probe
from gptdist.model import preset
from gptdist.precision_probe import (
    Matmul,
    ProbeResult,
    choose_precision,
    measure_precisions,
    model_matmuls,
    probe_precision,
)
from gptdist.train_step import resolve_precision

from support import FixedMeasure

CPU = torch.device("cpu")
SHAPES = [Matmul(256, 64, 192, 2), Matmul(256, 64, 50304, 1, linear=False)]


def test_bf16_only_when_faster_by_the_margin():
    assert choose_precision(100e9, 300e9) == "bf16"
    assert choose_precision(100e9, 112e9) == "bf16"
    assert choose_precision(100e9, 105e9) == "fp32"  # faster, but within the margin
    assert choose_precision(292e9, 159e9) == "fp32"  # the AVX-512 BF16 VM where bf16 trained at 0.6x


def test_cached_figures_are_reused(tmp_path):
    cache = tmp_path / "precision-probe.json"
    measure = FixedMeasure(100e9, 250e9)
    first = probe_precision(SHAPES, cache, measure)
    assert first == ProbeResult("bf16", 100e9, 250e9, cached=False)
    second = probe_precision(SHAPES, cache, measure)
    assert second == ProbeResult("bf16", 100e9, 250e9, cached=True)
    assert measure.calls == 1
    other_shapes = probe_precision(SHAPES[:1], cache, FixedMeasure(100e9, 50e9))
    assert other_shapes.precision == "fp32" and not other_shapes.cached
    assert len(json.loads(cache.read_text())) == 2  # one entry per shape set


def test_an_instruction_set_cap_is_another_machine(tmp_path, monkeypatch):
    """With oneDNN kept off AMX (ONEDNN_MAX_CPU_ISA) bf16 matmuls run at a
    fraction of their speed: the figures of the uncapped CPU must not be
    reused, nor the capped ones once the cap is gone."""
    cache = tmp_path / "precision-probe.json"
    for name in precision_probe.ISA_CAP_ENV:
        monkeypatch.delenv(name, raising=False)
    assert probe_precision(SHAPES, cache, FixedMeasure(100e9, 1000e9)).precision == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    capped = probe_precision(SHAPES, cache, FixedMeasure(200e9, 170e9))
    assert capped == ProbeResult("fp32", 200e9, 170e9, cached=False)
    assert probe_precision(SHAPES, cache, FixedMeasure(1, 1)) == ProbeResult("fp32", 200e9, 170e9, cached=True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert probe_precision(SHAPES, cache, FixedMeasure(1, 1)) == ProbeResult("bf16", 100e9, 1000e9, cached=True)
    caps = sorted(json.dumps(e.get("isa_caps")) for e in json.loads(cache.read_text()).values())
    assert caps == ["null", '{"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}']


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_measured_and_rewritten(tmp_path, content):
    cache = tmp_path / "precision-probe.json"
    cache.write_text(content)
    result = probe_precision(SHAPES, cache, FixedMeasure(200e9, 100e9))
    assert result == ProbeResult("fp32", 200e9, 100e9, cached=False)
    (entry,) = json.loads(cache.read_text()).values()
    assert (entry["fp32_flops"], entry["bf16_flops"]) == (200e9, 100e9)
    assert probe_precision(SHAPES, cache, FixedMeasure(1, 1)).cached


def test_forced_precision_wins_without_measuring():
    def must_not_run():
        raise AssertionError("measured although the precision was forced")

    for forced in ("fp32", "bf16", "fp16"):
        assert resolve_precision(forced, CPU, must_not_run) == (forced, None)
    measured = ProbeResult("bf16", 100e9, 300e9, cached=True)
    assert resolve_precision("auto", CPU, lambda: measured) == ("bf16", measured)


def test_measurement_is_bounded_and_covers_the_head(monkeypatch):
    """Each product and precision gets a warm-up call and at most `trials`
    timings (the budget is in calls, not a wall-clock limit), the LM head's
    chunk included."""
    torch.set_num_threads(1)
    matmuls = model_matmuls(preset("nano", block_size=64), micro_batch_size=4, chunked_loss=True)
    assert matmuls[-1] == Matmul(256, 64, 50304, 1, linear=False)  # one 256-row chunk of the head
    calls = Counter()
    real_runners = precision_probe.matmul_runners

    def counted(mm, kind, run):
        def call(n):
            calls[mm, kind] += 1
            run(n)
        return call

    monkeypatch.setattr(precision_probe, "matmul_runners", lambda mm: tuple(
        counted(mm, kind, run) for kind, run in zip(("fp32", "bf16"), real_runners(mm))))
    fp32_flops, bf16_flops = measure_precisions(matmuls, seconds=0.5, trials=3)
    assert fp32_flops > 1e8 and bf16_flops > 0
    assert all(2 <= calls[mm, "fp32"] <= 1 + 3 for mm in matmuls), calls
    assert all(calls[mm, "bf16"] <= 1 + 3 for mm in matmuls), calls


# A real run's precision and probe tags: tests/test_tracking.py
