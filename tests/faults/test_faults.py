"""Faults injected on purpose into real runs: real Ray Train workers, real
processes killed with SIGKILL, a real MLflow server stopped mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from support import (DIRECT_INGEST, audited_rows, free_port, sqlite_store, start_mlflow_server, stop_process_group,
                     tiny_config, wait_for)
from gptdist.fault_injection import FaultHooks
from gptdist.checkpoint import load_model_state, read_meta
from gptdist.checkpoint_source import checkpoint_folders, latest_ray_checkpoint, resolve_checkpoint
from gptdist.config import load_config
from gptdist.driver import train_main
from gptdist.tracking import last_logged_step

REPO = Path(__file__).resolve().parents[2]


def assert_same_params(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_cut_short_is_never_resumed_from(tmp_path, tiny_dataset, reference_run, capsys):
    """Two ways a checkpoint ends up incomplete, in the reference's run.
    First, rank 0 is SIGKILLed between model.pt and meta.json of the step-4
    checkpoint: that checkpoint never registers, Ray Train restarts the
    workers from step 2, the run ends at step 6 identical to the
    uninterrupted run and every checkpoint left in storage is complete.
    Then the latest checkpoint's meta.json is deleted and the same run is
    started again: training and its data stream resume from the complete
    one before it (step 4), `--from <run folder>` (sample/eval/export)
    loads that same one, and the result again equals the uninterrupted
    run's."""
    ref_tmp, ref = reference_run  # 2 workers, checkpoints at 2, 4, 6 (conftest.py)
    common = ["ray.num_workers=2", "train.checkpoint_interval=2"]
    cfg = tiny_config(tmp_path, tiny_dataset, "cut-short", "ray.max_failures=1", *common)
    summary = train_main(cfg, hooks=FaultHooks(audit_dir=str(tmp_path / "audit"), kill_while_checkpointing_step=4))
    run_dir = tmp_path / "ray" / "cut-short"
    assert summary["step"] == 6
    assert (run_dir / "killed-ckpt-4").exists()  # the kill happened
    assert_same_params(load_model_state(ref["checkpoint"])[0], load_model_state(summary["checkpoint"])[0])
    ref_rows = audited_rows(ref_tmp / "audit")
    assert audited_rows(tmp_path / "audit") == ref_rows
    for folder in checkpoint_folders(run_dir):
        read_meta(folder)  # every checkpoint left in storage is complete

    (run_dir / "checkpoint_00000006" / "meta.json").unlink()
    assert latest_ray_checkpoint(run_dir).name == "checkpoint_00000004"
    cfg = tiny_config(tmp_path, tiny_dataset, "cut-short", *common)
    assert resolve_checkpoint(str(run_dir), cfg).name == "checkpoint_00000004"  # what sample/eval/export load
    capsys.readouterr()
    summary = train_main(cfg, hooks=FaultHooks(audit_dir=str(tmp_path / "audit-again")))
    assert "checkpoint_00000006 is incomplete" in capsys.readouterr().out
    assert summary["step"] == 6
    assert_same_params(load_model_state(ref["checkpoint"])[0], load_model_state(summary["checkpoint"])[0])
    again = audited_rows(tmp_path / "audit-again")  # keyed by steps done before: 4 is the fifth step
    assert again == {step: ref_rows[step] for step in (4, 5)}


def train_overrides(tmp_path: Path, data: Path, name: str) -> list[str]:
    """A 12-step nano run whose workers read their rows directly (the
    subject here is the command's signals and its MLflow run, not the data
    path, which test_a_checkpoint_cut_short_is_never_resumed_from covers)."""
    return ["model.preset=nano", "model.block_size=64", f"data.path={data}", DIRECT_INGEST,
            "train.global_batch_size=8", "train.micro_batch_size=8", "train.max_steps=12",
            "train.log_interval=1", "train.eval_interval=6", "train.eval_batches=1",
            "train.checkpoint_interval=2", "train.sample_tokens=0", f"train.run_name={name}",
            f"ray.storage_path={tmp_path / 'ray'}", f"tracking.uri={sqlite_store(tmp_path)}",
            f"tracking.runs_dir={tmp_path}", "ray.local_num_cpus=2", "train.cpu_peak_flops=1.0e+11"]


def train_command(overrides: list[str]) -> list[str]:
    """`gptdist train --local` with these overrides, as a user types it."""
    args = [sys.executable, "-m", "gptdist.cli", "train", "--local"]
    for kv in overrides:
        args += ["--set", kv]
    return args


def local_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local run, not a job
    return env


def start_and_wait_for_a_checkpoint(args: list[str], run_dir: Path, log: Path,
                                    started_line: str) -> tuple[subprocess.Popen, int]:
    """Start the command; once its output shows `started_line`, note the
    latest complete checkpoint (0: none) and return the process and that
    step when a later one is complete: one this command wrote (a command
    SIGKILLed before may leave Ray workers that write one more checkpoint
    before they notice their node is gone)."""
    proc = subprocess.Popen(args, cwd=REPO, env=local_env(), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for(lambda: started_line in log.read_text() or proc.poll() is not None, timeout_s=400,
             what=f"{started_line!r} in {log}")
    before = latest_complete_step(run_dir)
    wait_for(lambda: latest_complete_step(run_dir) > before or proc.poll() is not None,
             timeout_s=400, what=f"a checkpoint after step {before}")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc, before


def latest_complete_step(run_dir: Path) -> int:
    return max((checkpoint_step(p) for p in checkpoint_folders(run_dir) if (p / "meta.json").exists()), default=0)


def checkpoint_step(folder: Path) -> int:
    """The step in a checkpoint folder's name (checkpoint_00000004: 4)."""
    return int(folder.name.rsplit("_", 1)[1])


def logged_through(tmp_path: Path) -> int:
    """The highest training step in the test's MLflow run so far."""
    client, run = the_only_run(tmp_path)
    return last_logged_step(client, run.info.run_id)


def the_only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptdist").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


NOISE = ["Reporting training result", "PreemptionWatcher", "Progress bars disabled", "Running Dataset",
         "Token authentication is enabled", "Creating initial MLflow database tables", "Started a local Ray instance"]


PROGRESS = re.compile(r"^step +(\d+)/(\d+) \| loss [\d.]+ \| val (?:[\d.]+|-) \| lr \S+ \| [\d,]+ ms/step "
                      r"\| [\d,]+ tok/s \| mfu \S+ \| eta \d+m\d\ds$")


def assert_console_contract(output: str, max_steps: int) -> None:
    """What `gptdist train --local` prints (stdout and stderr together):
    where Ray's logs are, progress lines with totals (without Ray's worker
    prefix), none of Ray's noise."""
    assert "Ray ready in" in output and "its logs: /" in output, output[-2000:]
    progress = [line for line in output.splitlines() if line.startswith("step ")]
    assert progress and all(PROGRESS.match(line) for line in progress), progress
    assert {PROGRESS.match(line).group(2) for line in progress} == {str(max_steps)}
    assert not [line for line in output.splitlines() if "(RayTrainWorker" in line and "step " in line], output[-2000:]
    for noise in NOISE:
        assert noise not in output, noise


def test_kill_the_driver_then_ctrl_c_then_resume(tmp_path, tiny_dataset, capsys):
    """The same `gptdist train` command twice, as a user would. SIGKILL of
    the whole command mid-run; then the command again: it resumes from the
    latest checkpoint into the same MLflow run, each step logged once, until
    Ctrl-C (SIGINT to the process group, as a terminal sends it) ends it with
    exit code 130 and the MLflow run KILLED, tagged interrupted, not FAILED.
    Then the same run once more, by the function the command calls (on the
    test's Ray, a cold start less): FINISHED, steps 1..12 logged once each,
    no error or interruption tag left."""
    overrides = train_overrides(tmp_path, tiny_dataset, "interrupted")
    args = train_command(overrides)
    run_dir = tmp_path / "ray" / "interrupted"
    first, _ = start_and_wait_for_a_checkpoint(args, run_dir, tmp_path / "first.log", "run interrupted:")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    second, resumed_after = start_and_wait_for_a_checkpoint(args, run_dir, tmp_path / "second.log",
                                                             "resuming MLflow run")
    assert resumed_after > 0  # the first command left a checkpoint
    # A checkpoint folder is complete before the Train controller takes its
    # report (and logs it to MLflow): Ctrl-C once a later step is logged.
    wait_for(lambda: logged_through(tmp_path) > resumed_after or second.poll() is not None, timeout_s=400,
             what=f"a step after {resumed_after} in the MLflow run")
    os.killpg(second.pid, signal.SIGINT)
    assert second.wait(timeout=120) == 130, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    assert "resuming MLflow run" in output, output[-3000:]
    assert_console_contract(output, max_steps=12)
    client, run = the_only_run(tmp_path)
    assert run.info.status == "KILLED", output[-3000:]
    assert "interrupted" in run.data.tags["gptdist.interrupted"]
    assert "gptdist.error" not in run.data.tags
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > resumed_after  # each step once, so far

    capsys.readouterr()
    summary = train_main(load_config(overrides=overrides))
    assert "resuming MLflow run" in capsys.readouterr().out
    assert summary["step"] == 12 and summary["mlflow_run_id"] == run.info.run_id
    client, run = the_only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert "gptdist.interrupted" not in run.data.tags and "gptdist.error" not in run.data.tags
    for key in ("train/loss", "lr", "tokens_seen"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 13)), key
    assert read_meta(checkpoint_folders(run_dir)[-1])["step"] == 12


def logged_losses(uri: str, experiment: str) -> int:
    """How many training-loss values the tracking server holds."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return sum(len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs)


def test_mlflow_server_dies_mid_run(tmp_path, tiny_dataset):
    """Training goes on when the tracking server goes away; what was logged
    before is still in its store (which a restarted server serves)."""
    port = free_port()
    root = tmp_path / "server"
    root.mkdir()
    server = start_mlflow_server(root, port)
    uri = f"http://127.0.0.1:{port}"
    # 30 steps: the server goes away after the first logged loss, with most
    # of the run still ahead.
    cfg = tiny_config(tmp_path, tiny_dataset, "server-dies", "ray.num_workers=1", "train.max_steps=30", DIRECT_INGEST,
                      uri=uri)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_main(cfg)))
    thread.start()
    try:
        wait_for(lambda: logged_losses(uri, cfg.tracking.experiment), what="a training loss on the server")
        stop_process_group(server)
        assert thread.is_alive(), "the run ended before the server was stopped"
        thread.join(timeout=600)
        assert result["step"] == 30 and Path(result["checkpoint"]).is_dir()
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the server's own store
        run = client.get_run(result["mlflow_run_id"])
        assert run.data.params["train.run_name"] == "server-dies"
        assert client.get_metric_history(run.info.run_id, "train/loss")  # the early history survived
    finally:
        stop_process_group(server)  # a no-op when already stopped


def test_non_finite_loss_stops_with_a_checkpoint(tmp_path, tiny_dataset):
    from ray.train import TrainingFailedError

    cfg = tiny_config(tmp_path, tiny_dataset, "nan", "ray.num_workers=1", "train.max_nonfinite_steps=2", DIRECT_INGEST,
                      "train.checkpoint_interval=2")
    with pytest.raises(TrainingFailedError) as failure:
        train_main(cfg, hooks=FaultHooks(nan_loss_from_step=3))
    assert "2 steps in a row had a non-finite loss" in str(failure.value)
    checkpoints = checkpoint_folders(tmp_path / "ray" / "nan")
    meta = read_meta(checkpoints[-1])
    assert meta["step"] == 5  # steps 4 and 5 were skipped, the weights are step 3's
    state, _ = load_model_state(checkpoints[-1])
    assert all(torch.isfinite(t).all() for t in state.values())
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("gptdist").experiment_id])[0]
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["gptdist.error"]
