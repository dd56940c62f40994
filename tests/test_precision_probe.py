"""`train.precision: auto` on a CPU: measured, cached per machine, tagged."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from gptdist.model import preset
from gptdist.precision_probe import (
    CACHE_DIR_ENV,
    Matmul,
    ProbeResult,
    choose_precision,
    measure_precisions,
    model_matmuls,
    probe_precision,
)
from gptdist.train_step import resolve_precision
from gptdist.driver import train_main

from support import DIRECT_INGEST, tiny_config

CPU = torch.device("cpu")
SHAPES = [Matmul(256, 64, 192, 2), Matmul(256, 64, 50304, 1, linear=False)]


class FakeMeasure:
    """Stands in for measure_precisions: fixed figures, counted calls."""

    def __init__(self, fp32_flops: float, bf16_flops: float):
        self.figures, self.calls = (fp32_flops, bf16_flops), 0

    def __call__(self, matmuls):
        self.calls += 1
        return self.figures


def test_bf16_only_when_faster_by_the_margin():
    assert choose_precision(100e9, 300e9) == "bf16"
    assert choose_precision(100e9, 112e9) == "bf16"
    assert choose_precision(100e9, 105e9) == "fp32"  # faster, but within the margin
    assert choose_precision(292e9, 159e9) == "fp32"  # the AVX-512 BF16 VM where bf16 trained at 0.6x


def test_cached_figures_are_reused(tmp_path):
    cache = tmp_path / "precision-probe.json"
    measure = FakeMeasure(100e9, 250e9)
    first = probe_precision(SHAPES, cache, measure)
    assert first == ProbeResult("bf16", 100e9, 250e9, cached=False)
    second = probe_precision(SHAPES, cache, measure)
    assert second == ProbeResult("bf16", 100e9, 250e9, cached=True)
    assert measure.calls == 1
    other_shapes = probe_precision(SHAPES[:1], cache, FakeMeasure(100e9, 50e9))
    assert other_shapes.precision == "fp32" and not other_shapes.cached
    assert len(json.loads(cache.read_text())) == 2  # one entry per shape set


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_measured_and_rewritten(tmp_path, content):
    cache = tmp_path / "precision-probe.json"
    cache.write_text(content)
    result = probe_precision(SHAPES, cache, FakeMeasure(200e9, 100e9))
    assert result == ProbeResult("fp32", 200e9, 100e9, cached=False)
    (entry,) = json.loads(cache.read_text()).values()
    assert (entry["fp32_flops"], entry["bf16_flops"]) == (200e9, 100e9)
    assert probe_precision(SHAPES, cache, FakeMeasure(1, 1)).cached


def test_forced_precision_wins_without_measuring():
    def must_not_run():
        raise AssertionError("measured although the precision was forced")

    for forced in ("fp32", "bf16", "fp16"):
        assert resolve_precision(forced, CPU, must_not_run) == (forced, None)
    measured = ProbeResult("bf16", 100e9, 300e9, cached=True)
    assert resolve_precision("auto", CPU, lambda: measured) == ("bf16", measured)


def test_measurement_is_short_and_covers_the_head():
    torch.set_num_threads(1)
    matmuls = model_matmuls(preset("nano", block_size=64), micro_batch_size=4, chunked_loss=True)
    assert matmuls[-1] == Matmul(256, 64, 50304, 1, linear=False)  # one 256-row chunk of the head
    start = time.perf_counter()
    fp32_flops, bf16_flops = measure_precisions(matmuls, seconds=0.5, trials=3)
    assert time.perf_counter() - start < 10  # 0.5 s asked, plus warm-up calls on a busy machine
    assert fp32_flops > 1e8 and bf16_flops > 0


@pytest.fixture(scope="module")
def probe_cache_dir(tmp_path_factory):
    """An empty cache folder for the module, in the environment before the
    module's Ray starts (`tiny_dataset`), so that its workers inherit it."""
    folder = tmp_path_factory.mktemp("gptdist-cache")
    saved = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = saved


def test_auto_run_tags_its_precision_and_the_probe_figures(probe_cache_dir, tiny_dataset, tmp_path):
    cfg = tiny_config(tmp_path, tiny_dataset, "auto-precision", "train.precision=auto", "ray.num_workers=2", DIRECT_INGEST,
                      "train.max_steps=2", "train.eval_interval=2", "train.checkpoint_interval=2")
    summary = train_main(cfg)
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["mlflow_run_id"]).data.tags
    fp32 = float(tags["gptdist.precision_probe.fp32_gflops"])
    bf16 = float(tags["gptdist.precision_probe.bf16_gflops"])
    assert fp32 > 0 and bf16 > 0
    assert tags["gptdist.precision"] == choose_precision(fp32, bf16)
    assert tags["gptdist.precision_probe.cached"] == "false"
    (entry,) = json.loads((probe_cache_dir / "precision-probe.json").read_text()).values()
    assert entry["fp32_flops"] / 1e9 == pytest.approx(fp32, abs=0.1)
    assert entry["bf16_flops"] / 1e9 == pytest.approx(bf16, abs=0.1)
    assert entry["threads"] == max(1, (os.cpu_count() or 1) // 2)  # rank 0 measured with its own thread count
