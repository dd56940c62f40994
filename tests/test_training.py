"""Distributed training on real Ray Train workers with gloo DDP on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError

from data_pipeline.manifest import DatasetError
from gptdist.fault_injection import FaultHooks
from gptdist.checkpoint import load_model_state
from gptdist.config import ConfigError, load_config
from gptdist.driver import CONTROLLER_POLL_ENV, parameter_line, parameter_tags, train_main
from gptdist.preflight import check_memory, resolve_micro_batch

from support import audited_rows, tiny_config as make_config


def final_params(summary) -> dict[str, torch.Tensor]:
    state, _ = load_model_state(summary["checkpoint"])
    return state


def loss_history(tmp: Path, run_id: str) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def test_two_workers_loss_falls_and_ranks_agree(reference_run):
    tmp, summary = reference_run  # 2 workers, 6 steps (conftest.py)
    history = loss_history(tmp, summary["mlflow_run_id"])
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert history[6] < history[1] - 0.5
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Ray Train handed its controller the configured poll interval.
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    assert get_env_vars_to_propagate()[CONTROLLER_POLL_ENV] == "0.25"


def test_the_summary_says_whether_the_workers_ended_with_the_same_parameters():
    same, other = "a" * 64, "b" * 64
    assert parameter_tags([same, same]) == {"gptdist.param_sha256": same, "gptdist.workers_agree": "true"}
    assert parameter_tags([same, other]) == {"gptdist.param_sha256": same, "gptdist.workers_agree": "false"}
    assert parameter_tags([]) == {}
    assert parameter_line([same]) == f"final parameters: sha256 {same[:16]}"
    assert parameter_line([same, same]) == f"final parameters: sha256 {same[:16]}, identical on all 2 workers"
    assert parameter_line([same, other]).startswith("warning: the workers ended with different parameters")
    assert other[:16] in parameter_line([same, other])


def test_a_failed_run_resumes_exactly_on_another_worker_count(tmp_path, tiny_dataset, reference_run):
    """2 workers fail at step 4 with no retry left (the latest checkpoint is
    step 3); the same command on 1 worker resumes from it, and the weights,
    the rows each step trained and the MLflow history equal the
    uninterrupted 2-worker run's: after the resume, 1 worker x 2 micro-steps
    trains what 2 workers x 1 micro-step did, at the same global batch.
    (Ray Train's own restarts after a failure are the subject of
    tests/faults/test_faults.py.)"""
    tmp_ref, ref = reference_run
    first = make_config(tmp_path, tiny_dataset, "resized", "ray.num_workers=2", "train.fail_at_step=4",
                        "ray.max_failures=0")
    with pytest.raises(TrainingFailedError, match="injected fault at step 4"):
        train_main(first, hooks=FaultHooks(audit_dir=str(tmp_path / "audit-first")))
    first_rows = audited_rows(tmp_path / "audit-first")  # keyed by steps done before: 0 is the first
    assert sorted(first_rows) == [0, 1, 2, 3]  # the fourth step trained, after the last checkpoint
    second = make_config(tmp_path, tiny_dataset, "resized", "ray.num_workers=1")
    summary = train_main(second, hooks=FaultHooks(audit_dir=str(tmp_path / "audit-second")))
    assert summary["step"] == 6
    ref_params, params = final_params(ref), final_params(summary)
    # One worker sums the batch's gradients in another order than gloo's
    # all-reduce over two, and Adam turns a rounding difference in a
    # near-zero gradient into a visible one (1.1e-6 has been seen). A resume
    # that lost a step, the optimizer state or the learning-rate schedule
    # differs by about one update, lr = 3e-3: 300 times this tolerance.
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-5)
    second_rows = audited_rows(tmp_path / "audit-second")
    assert sorted(second_rows) == [3, 4, 5]  # resumed from the checkpoint of step 3
    rows = {**{step: r for step, r in first_rows.items() if step < 3}, **second_rows}
    assert rows == audited_rows(tmp_ref / "audit")
    every = [r for step_rows in rows.values() for r in step_rows]
    assert len(every) == len(set(every)) == 6 * 8  # the whole epoch, each row once
    # One MLflow run for both invocations, with a continuous history.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptdist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history, ref_history = loss_history(tmp_path, runs[0].info.run_id), loss_history(tmp_ref, ref["mlflow_run_id"])
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # the resumed steps, accumulated over 2 micro-steps
        assert abs(history[step] - ref_history[step]) < 1e-4, (step, history[step], ref_history[step])


def test_bad_config_fails_before_workers(tmp_path, tiny_dataset):
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not divisible by .*micro_batch_size=4 x ray\.num_workers=3"):
        make_config(tmp_path, tiny_dataset, "bad", "ray.num_workers=3")
    cfg = make_config(tmp_path, tiny_dataset, "bad-block", "model.block_size=128")
    with pytest.raises(DatasetError, match=r"block_size=64, but the model has block_size=128"):
        train_main(cfg)
    assert not (tmp_path / "ray" / "bad-block").exists()  # no worker ever started


def test_micro_batch_auto_on_a_real_node(ray_local):
    """`--set ray.num_workers=2` alone is a valid run; a batch too large for
    one forward pass is split into micro-steps that fit this node; an
    explicit value stays as it is."""
    two = load_config(overrides=["ray.num_workers=2"])
    resolve_micro_batch(two)
    assert two.train.micro_batch_size == 4
    big = load_config(overrides=["model.preset=gpt2-medium", "train.global_batch_size=64"])
    resolve_micro_batch(big)
    assert 1 <= big.train.micro_batch_size < 64 and 64 % big.train.micro_batch_size == 0
    check_memory(big)  # fits now
    explicit = load_config(overrides=["ray.num_workers=2", "train.micro_batch_size=2"])
    resolve_micro_batch(explicit)
    assert explicit.train.micro_batch_size == 2
