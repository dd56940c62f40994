"""The MLflow coordinator against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.reader import first_row_tokens
from gptdist.attention_probe import choose_attention
from gptdist.run_data import DatasetInfo, log_dataset_input
from gptdist.runs import format_table, run_rows
from gptdist.tokenizer import decode
from gptdist.precision_probe import CACHE_DIR_ENV, choose_precision
from gptdist.tracking import TrackingUnavailableError, open_tracking
from gptdist.driver import train_main

from support import BLOCK, DIRECT_INGEST, free_port, tiny_config

REPO = Path(__file__).resolve().parents[1]


def config(tmp: Path, data: Path, uri: str, name: str, *extra: str):
    return tiny_config(tmp, data, name, "train.max_steps=4", "train.eval_interval=2", "train.eval_batches=1",
                       "train.checkpoint_interval=2", "tracking.experiment=tracking-test", DIRECT_INGEST, *extra,
                       uri=uri)


@pytest.fixture(scope="module")
def probe_cache_dir(tmp_path_factory):
    """An empty precision-probe cache folder for the module, in the driver's
    environment (the driver hands it to the workers in their runtime_env)."""
    folder = tmp_path_factory.mktemp("gptdist-cache")
    with pytest.MonkeyPatch.context() as patch:  # restored after the module
        patch.setenv(CACHE_DIR_ENV, str(folder))
        yield folder


SERVER_RUN = ["ray.num_workers=2", "train.precision=auto", "tracking.log_checkpoints=all", "train.cpu_peak_flops=null"]


@pytest.fixture(scope="module")
def server_run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-run")


@pytest.fixture(scope="module")
def server_run(server_run_dir, tiny_dataset, mlflow_server, probe_cache_dir):
    """2 workers as a user runs them: precision and the MFU peak measured
    by the workers (`auto`), every checkpoint logged. 4 steps; the resume
    test below trains it on to 6."""
    return train_main(config(server_run_dir, tiny_dataset, mlflow_server, "two-workers", *SERVER_RUN))


def test_two_worker_run_is_fully_logged(server_run, mlflow_server, tiny_dataset):
    client = MlflowClient(mlflow_server)
    run = client.get_run(server_run["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "two-workers"
    p = run.data.params
    assert p["model.preset"] == "nano" and p["ray.num_workers"] == "2" and p["train.max_steps"] == "4"
    assert int(p["derived.num_params"]) > 3_000_000 and p["derived.global_batch_tokens"] == str(8 * BLOCK)
    tags = run.data.tags
    assert tags["gptdist.run_kind"] == "train"
    assert tags["gptdist.device_type"] == "cpu"
    assert tags["gptdist.precision"] in ("fp32", "bf16") and tags["gptdist.world_size"] == "2"
    assert tags["gptdist.worker_keeps_freed_memory"] == "true"  # the malloc settings reached the workers
    digests = server_run["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == tags["gptdist.param_sha256"]
    assert tags["gptdist.workers_agree"] == "true"
    assert len(tags["gptdist.dataset_manifest_sha256"]) == 64
    # The data is the dataset's own record, not the config's default sources.
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert json.loads(p["data.sources"]) == manifest["sources"] != ["shakespeare"]
    assert p["data.manifest_sha256"] == tags["gptdist.dataset_manifest_sha256"]
    assert tags["gptdist.dataset"] == tiny_dataset.name
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == tiny_dataset.name and used.dataset.digest == p["data.manifest_sha256"][:16]
    # No prompt configured: one from the dataset's text.
    first_val_row = decode(first_row_tokens(tiny_dataset, "val"))
    assert p["train.sample_prompt"] not in ("", "ROMEO:", "None") and p["train.sample_prompt"] in first_val_row
    assert {"gptdist.torch_version", "gptdist.ray_version", "gptdist.mlflow_version"} <= set(tags)
    for key in ("train/loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_ms", "tokens_seen"):
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)] == [1, 2, 3, 4], key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [2, 4]
    faults = client.get_metric_history(run.info.run_id, "worker_page_faults_per_step")
    assert sorted(m.step for m in faults) == [1, 2, 3, 4] and all(m.value >= 0 for m in faults)
    # Evaluation and checkpoint writing are timed on their own, outside the steps' time.
    for key in ("eval_s", "checkpoint_save_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [2, 4] and all(m.value > 0 for m in history), key
    # MFU is achieved FLOP/s over the logged peak of both workers
    peak = float(tags["gptdist.mfu_peak_tflops"]) * 1e12
    assert peak > 0 and peak != 1.0e11  # measured, not tiny_config's fixed value
    speeds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_s")}
    for m in client.get_metric_history(run.info.run_id, "mfu"):
        expected = speeds[m.step] * int(p["derived.flops_per_token"]) / peak
        assert 0 < m.value < 1 and m.value == pytest.approx(expected, rel=0.01)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset_manifest.json", "loss_curve.png", "model", "samples", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.pt", "model/meta.json"}
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 2
    assert len(client.list_artifacts(run.info.run_id, "checkpoints")) == 2


def test_auto_run_tags_its_precision_and_the_probe_figures(server_run, mlflow_server, probe_cache_dir):
    tags = MlflowClient(mlflow_server).get_run(server_run["mlflow_run_id"]).data.tags
    fp32 = float(tags["gptdist.precision_probe.fp32_gflops"])
    bf16 = float(tags["gptdist.precision_probe.bf16_gflops"])
    assert fp32 > 0 and bf16 > 0
    assert tags["gptdist.precision"] == choose_precision(fp32, bf16)
    assert tags["gptdist.precision_probe.cached"] == "false"
    (entry,) = json.loads((probe_cache_dir / "precision-probe.json").read_text()).values()
    assert entry["fp32_flops"] / 1e9 == pytest.approx(fp32, abs=0.1)
    assert entry["bf16_flops"] / 1e9 == pytest.approx(bf16, abs=0.1)
    assert entry["threads"] == max(1, (os.cpu_count() or 1) // 2)  # rank 0 measured with its own thread count


def test_auto_run_tags_its_attention_and_the_probe_timings(server_run, mlflow_server, probe_cache_dir):
    tags = MlflowClient(mlflow_server).get_run(server_run["mlflow_run_id"]).data.tags
    sdpa_ms = float(tags["gptdist.attention_probe.sdpa_ms"])
    matmul_ms = float(tags["gptdist.attention_probe.matmul_ms"])
    assert sdpa_ms > 0 and matmul_ms > 0
    measured_in = "bf16" if tags["gptdist.precision"] == "bf16" else "fp32"
    assert tags["gptdist.attention"] == choose_attention(sdpa_ms / 1e3, matmul_ms / 1e3, measured_in)
    assert tags["gptdist.attention_probe.cached"] == "false"
    (entry,) = json.loads((probe_cache_dir / "attention-probe.json").read_text()).values()
    assert entry["sdpa_s"] * 1e3 == pytest.approx(sdpa_ms, abs=0.01)
    # measured at the run's shape (nano, 4 sequences a worker) in the precision it chose
    assert entry["attention"] == {"batch": 4, "heads": 2, "positions": BLOCK, "head_dim": 32,
                                  "precision": measured_in}


def test_resumed_run_appends_to_the_same_mlflow_run(server_run, server_run_dir, tiny_dataset, mlflow_server):
    """The same command with more steps (and the glibc default malloc)
    resumes the finished 4-step run from its step-4 checkpoint: one MLflow
    run with steps 1-6 once each, its tags the resumed workers'."""
    cfg = config(server_run_dir, tiny_dataset, mlflow_server, "two-workers", *SERVER_RUN, "train.max_steps=6",
                 "ray.worker_keeps_freed_memory=false")
    resumed = train_main(cfg)
    assert resumed["mlflow_run_id"] == server_run["mlflow_run_id"] and resumed["step"] == 6
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`gptdist.run_name` = 'two-workers'")
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "lr", "tokens_seen"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4, 5, 6], key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [2, 4, 6]
    assert run.data.tags["gptdist.worker_keeps_freed_memory"] == "false"
    assert len(client.list_artifacts(run.info.run_id, "checkpoints")) == 3


def start_a_run_at_the_barrier(cfg, dataset: DatasetInfo, barrier, results) -> None:
    """What each run of a sweep does first, as train_main does it: open the
    store, find or create the experiment, start its MLflow run, then log the
    dataset. In a child process; `barrier` releases them together."""
    try:
        barrier.wait(timeout=60)
        client, run_id, _ = open_tracking(cfg, {"model.n_layer": 1}, "tune")
        barrier.wait(timeout=60)
        log_dataset_input(client, run_id, dataset)
        results.put((client.get_run(run_id).info.experiment_id, run_id))
    except Exception as e:
        barrier.abort()  # the others stop waiting for this one
        results.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_runs_starting_together_share_experiment_and_dataset(store, tmp_path, tiny_dataset, request):
    """A sweep's trials start at the same moment. MLflow creates an
    experiment, and a dataset record, by looking it up and inserting it
    when absent: without the retries, all but one of these runs failed on
    the store's unique key. The SQLite store is new: without the lock, its
    tables' creation failed in all but one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    experiment = f"together-{uuid.uuid4().hex[:8]}"
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    dataset = DatasetInfo(str(tiny_dataset), manifest, "ab" * 32)
    fork = multiprocessing.get_context("fork")
    n = 4
    barrier, results = fork.Barrier(n), fork.Queue()
    procs = [fork.Process(target=start_a_run_at_the_barrier, daemon=True, args=(
        config(tmp_path, tiny_dataset, uri, f"trial-{i}", f"tracking.experiment={experiment}"),
        dataset, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            p.kill()
    assert all(isinstance(o, tuple) for o in outcomes), outcomes
    assert len({experiment_id for experiment_id, _ in outcomes}) == 1
    client = MlflowClient(uri)
    assert client.get_experiment(outcomes[0][0]).name == experiment
    for _, run_id in outcomes:
        (used,) = client.get_run(run_id).inputs.dataset_inputs
        assert used.dataset.name == tiny_dataset.name and used.dataset.digest == "ab" * 8


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, tiny_dataset):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = config(tmp_path, tiny_dataset, uri, "nowhere")
    with pytest.raises(TrackingUnavailableError, match=uri.replace(".", r"\.")):
        train_main(cfg)
    assert not (tmp_path / "ray" / "nowhere").exists()  # no Ray worker started


def test_runs_table_lists_runs(server_run, mlflow_server, tmp_path, tiny_dataset):
    cfg = config(tmp_path, tiny_dataset, mlflow_server, "unused")
    rows = run_rows(cfg)
    by_name = {r["name"]: r for r in rows}
    two = by_name["two-workers"]
    assert (two["n_layer"], two["n_head"], two["n_embd"]) == ("2", "2", "64")
    assert two["status"] == "FINISHED" and two["steps"] == 6  # resumed to 6 by the test above
    client = MlflowClient(mlflow_server)
    final = max(client.get_metric_history(server_run["mlflow_run_id"], "val/loss"), key=lambda m: m.step).value
    assert two["val loss"] == pytest.approx(final)
    assert two["dataset"] == tiny_dataset.name
    table = format_table(rows)
    assert "two-workers" in table and "val loss" in table and "dataset" in table
    out = subprocess.run([sys.executable, "-m", "gptdist.cli", "runs", "--set", f"tracking.uri={mlflow_server}",
                          "--experiment", "tracking-test"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "two-workers" in out.stdout


def test_mlflow_ui_lists_runs_in_headless_chromium(server_run, mlflow_server):
    """The experiment page of the real UI, rendered by a real browser."""
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={artifacts / 'chromium-profile'}", "--virtual-time-budget=20000",
              "--window-size=1400,900"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    subprocess.run(common + [f"--screenshot={artifacts / 'mlflow-ui.png'}", url], capture_output=True, timeout=180)
    assert "two-workers" in dom.stdout, dom.stdout[-2000:]
    assert (artifacts / "mlflow-ui.png").stat().st_size > 10_000
