"""Distributed training on real Ray Train workers with gloo DDP on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_pipeline.manifest import DatasetError
from gptdist.fault_injection import FaultHooks
from gptdist.checkpoint import load_model_state
from gptdist.config import ConfigError, load_config
from gptdist.driver import CONTROLLER_POLL_ENV, train_main
from gptdist.preflight import check_memory, resolve_micro_batch

from support import audited_rows, tiny_config as make_config


def final_params(summary) -> dict[str, torch.Tensor]:
    state, _ = load_model_state(summary["checkpoint"])
    return state


def loss_history(tmp: Path, run_id: str) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, tiny_dataset):
    tmp = tmp_path_factory.mktemp("run2w")
    cfg = make_config(tmp, tiny_dataset, "two-workers", "ray.num_workers=2")
    summary = train_main(cfg, hooks=FaultHooks(audit_dir=str(tmp / "audit")))
    return tmp, summary


def test_two_workers_loss_falls_and_ranks_agree(two_worker_run):
    tmp, summary = two_worker_run
    history = loss_history(tmp, summary["mlflow_run_id"])
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert history[6] < history[1] - 0.5
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Ray Train handed its controller the configured poll interval.
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    assert get_env_vars_to_propagate()[CONTROLLER_POLL_ENV] == "0.25"


def test_accumulation_matches_workers(tmp_path, tiny_dataset, two_worker_run):
    """1 worker x 2 micro-steps == 2 workers x 1 micro-step at the same global batch."""
    tmp2, summary2 = two_worker_run
    cfg = make_config(tmp_path, tiny_dataset, "one-worker-accum", "ray.num_workers=1")
    summary1 = train_main(cfg)
    one, two = loss_history(tmp_path, summary1["mlflow_run_id"]), loss_history(tmp2, summary2["mlflow_run_id"])
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


def test_failure_resumes_exactly(tmp_path, tiny_dataset, two_worker_run):
    """Fail at step 4 (last checkpoint at 3): Ray Train restarts the workers
    from it and the result matches the uninterrupted run."""
    tmp_ref, ref = two_worker_run
    cfg = make_config(tmp_path, tiny_dataset, "failing", "ray.num_workers=2",
                      "train.fail_at_step=4", "ray.max_failures=1")
    summary = train_main(cfg, hooks=FaultHooks(audit_dir=str(tmp_path / "audit")))
    assert summary["step"] == 6
    ref_params, params = final_params(ref), final_params(summary)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6)
    rows = audited_rows(tmp_path / "audit")
    assert rows == audited_rows(tmp_ref / "audit")
    every = [r for step_rows in rows.values() for r in step_rows]
    assert len(every) == len(set(every)) == 6 * 8  # the whole epoch, each row once


def test_resume_on_other_worker_count(tmp_path, tiny_dataset, two_worker_run):
    """Stop after 3 steps on 2 workers; the same run name continues on 1."""
    tmp_ref, ref = two_worker_run
    audit = FaultHooks(audit_dir=str(tmp_path / "audit"))
    first = make_config(tmp_path, tiny_dataset, "resized", "ray.num_workers=2", "train.max_steps=3",
                        "train.lr_decay_steps=6")
    train_main(first, hooks=audit)
    second = make_config(tmp_path, tiny_dataset, "resized", "ray.num_workers=1", "train.lr_decay_steps=6")
    summary = train_main(second, hooks=audit)
    assert summary["step"] == 6
    ref_params, params = final_params(ref), final_params(summary)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6)
    assert audited_rows(tmp_path / "audit") == audited_rows(tmp_ref / "audit")
    # One MLflow run for both invocations, with a continuous history.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptdist").experiment_id])
    assert len(runs) == 1
    assert sorted(loss_history(tmp_path, runs[0].info.run_id)) == [1, 2, 3, 4, 5, 6]


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
