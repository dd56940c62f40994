"""A configuration too large for the machine is refused before any worker
starts, with the estimate, the memory and the knobs; an out-of-memory kill
that still happens is one line saying so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptdist.config import load_config
from gptdist.memory_estimate import GiB, MemoryEstimateError, auto_micro_batch, check_fits, is_out_of_memory
from gptdist.preflight import estimate_worker_memory

REPO = Path(__file__).resolve().parents[2]


def test_the_estimate_matches_measured_workers():
    """bench/results: Ray Train workers peaked at 1.1-1.2 GB (`micro`) and
    1.9-2.3 GB (`mini`) at 8x512 rows with the chunked loss and SDPA, and
    `mini` at 2.7 GB with the matmul attention in fp32."""
    sdpa = "train.attention=sdpa"
    micro = estimate_worker_memory(load_config(overrides=["model.preset=micro", sdpa]), micro_batch=8).total / GiB
    mini = estimate_worker_memory(load_config(overrides=["model.preset=mini", sdpa]), micro_batch=8).total / GiB
    assert 1.0 < micro < 1.6 and 1.8 < mini < 2.8
    # `auto` may choose the matmul attention: its T x T probabilities are counted.
    auto = estimate_worker_memory(load_config(overrides=["model.preset=mini"]), micro_batch=8)
    assert 2.7 < auto.total / GiB < 3.3 and auto.attention > 0.5 * GiB
    # Without the chunked loss the 4096 x 50304 logits dominate.
    plain = estimate_worker_memory(load_config(overrides=["model.preset=mini", "train.chunked_loss=false"]), 8)
    assert plain.loss > 2 * GiB


def test_two_workers_on_a_node_need_twice_the_memory():
    per_worker = estimate_worker_memory(load_config(), micro_batch=8)
    check_fits(per_worker, 2, 2 * per_worker.total)
    with pytest.raises(MemoryEstimateError, match=r"2 worker\(s\) on one node"):
        check_fits(per_worker, 2, 2 * per_worker.total - 1)


def test_auto_micro_batch_takes_the_largest_divisor_that_fits():
    assert auto_micro_batch(8, lambda m: True) == 8
    assert auto_micro_batch(12, lambda m: m <= 5) == 4
    assert auto_micro_batch(64, lambda m: True, cap=16) == 16
    assert auto_micro_batch(8, lambda m: False) == 1  # check_memory then says why


def test_ray_memory_monitor_kills_are_recognised():
    from ray.exceptions import OutOfMemoryError

    failure = RuntimeError("Training failed")
    failure.__cause__ = OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert is_out_of_memory(failure)
    assert not is_out_of_memory(RuntimeError("rank 1: ValueError: bad batch"))


def test_gpt2_medium_at_batch_64_is_refused_before_any_worker(tmp_path, prepared_tiny_dataset):
    """The command a user typed on a 24 GB machine: refused in one line."""
    args = [sys.executable, "-m", "gptdist.cli", "train", "--local"]
    for kv in ["model.preset=gpt2-medium", "train.micro_batch_size=64", "train.global_batch_size=64",
               f"data.path={prepared_tiny_dataset}", f"ray.storage_path={tmp_path / 'ray'}",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.runs_dir={tmp_path}",
               "ray.local_num_cpus=2"]:
        args += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("gptdist train: error:")]
    assert len(error) == 1, out.stderr[-3000:]
    assert "needs about" in error[0] and "GiB" in error[0] and "train.micro_batch_size" in error[0]
    assert not (tmp_path / "ray").exists()  # no worker, no run folder
