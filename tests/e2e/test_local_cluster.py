"""gptdist on a real local cluster, end to end: the cluster/ scripts start a
Ray head and an MLflow server; jobs go in through the Ray Jobs API exactly
as they would on a remote cluster; the results are read back from the
MLflow server; the scripts stop everything they started.

The tests share one cluster (module scope) and run in file order; the last
one stops it and checks that nothing of ours is left running.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus

from support import LOOPBACK, listening_sockets

REPO = Path(__file__).resolve().parents[2]

EXPERIMENT = "gptdist-e2e"

# A tiny, fast run: the nano preset, a few steps, one eval and checkpoint
# every other step, one CPU per worker, no FLOP probe.
SMALL_RUN = [
    "model.preset=nano",
    "train.max_steps=4",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.eval_batches=1",
    "train.checkpoint_interval=2",
    "train.sample_tokens=8",
    "train.cpu_threads=1",
    "train.cpu_peak_flops=1.0e+11",
    "ray.cpus_per_worker=1",
    f"tracking.experiment={EXPERIMENT}",
]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def mlflow_run(cluster, run_name: str):
    client = MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return client, None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    assert len(runs) <= 1, f"{len(runs)} MLflow runs named {run_name}"
    return client, (runs[0] if runs else None)


def train_worker_nodes(cluster, ray_job_id: str) -> list[str]:
    """The nodes the job's Ray Train workers ran on, from Ray's state API
    on the dashboard."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    options = ListApiOptions(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)],
                             detail=True, limit=1000)
    return sorted(w.node_id for w in state.list(StateResource.ACTORS, options, raise_on_missing_output=False))


def test_train_job_runs_ddp_across_two_nodes_and_logs_to_the_mlflow_server(local_cluster, prepared_data, tmp_path):
    """A second Ray node joins the cluster; a train job submitted through
    the Jobs API puts one DDP rank on each (SPREAD), gloo between them, and
    checkpoints to a folder both nodes see; the MLflow server holds the run."""
    added = local_cluster.run_script("add_local_node.sh", env={"GPTDIST_NODE_NUM_CPUS": "2"})
    assert added.returncode == 0, added.stdout + added.stderr
    local_cluster.remember_pids()

    storage = tmp_path / "shared-storage"
    run_name = "e2e-two-nodes"
    argv = [
        "python", "-m", "jobs.train",
        *sets(["ray.address=auto", *SMALL_RUN, "train.max_steps=6", "train.global_batch_size=4",
               "train.learning_rate=0.003", "ray.num_workers=2", "ray.placement_strategy=SPREAD",
               f"data.path={prepared_data}", f"ray.storage_path={storage}", f"train.run_name={run_name}"]),
    ]
    client = local_cluster.job_client()
    started = time.monotonic()
    job_id = client.submit_job(entrypoint=shlex.join(argv), runtime_env=local_cluster.runtime_env())
    status, logs = local_cluster.wait_for_job(job_id)
    print(f"train job: {status} after {time.monotonic() - started:.0f} s")
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    assert f"run {run_name} finished at step 6" in logs
    assert "identical on all 2 workers" in logs  # DDP kept the ranks' parameters bit-identical

    # One rank on each node.
    worker_nodes = train_worker_nodes(local_cluster, client.get_job_info(job_id).job_id)
    assert len(worker_nodes) == 2 and len(set(worker_nodes)) == 2, (
        f"the two ranks did not run on two nodes: {worker_nodes}"
    )

    # The server, not a local store, holds the run: the job found it through
    # MLFLOW_TRACKING_URI, which the runtime env took from the cluster.
    mlflow, run = mlflow_run(local_cluster, run_name)
    assert run is not None, f"no MLflow run {run_name} on {local_cluster.mlflow_url}"
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "nano" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["gptdist.workers_agree"] == "true"
    assert {"train/loss", "val/loss"} <= set(run.data.metrics)
    history = sorted(mlflow.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1].value < history[0].value, [m.value for m in history]
    model_files = {a.path for a in mlflow.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.pt", "model/meta.json"} <= model_files
    meta = json.loads(open(mlflow.download_artifacts(run.info.run_id, "model/meta.json", str(tmp_path))).read())
    assert meta["step"] == 6
    # Artifacts are in the store's artifact folder: the runs folder holding the
    # cluster's state folder, where `gptdist train --local` keeps them too.
    assert list((local_cluster.state_dir.parent / "mlartifacts").rglob("model.pt"))

    # Checkpoints are where ray.storage_path said, complete, written by the
    # rank on whichever node into the folder both see.
    checkpoints = sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "meta.json").is_file() for c in checkpoints)
    assert json.loads((checkpoints[-1] / "meta.json").read_text())["step"] == 6

    # The head, the added node, their workers, the Ray Client server and
    # MLflow listen on 127.0.0.1 only (every socket of the groups the
    # cluster scripts started).
    sockets = listening_sockets(local_cluster.member_pids())
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert any(port == local_cluster.ports["client"] for _, port, _ in sockets), sockets
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, exposed


def test_bad_config_job_fails_with_the_error_and_writes_nothing(local_cluster, prepared_data, tmp_path):
    storage = tmp_path / "storage"
    run_name = "e2e-bad-config"
    before = sorted(p.name for p in prepared_data.iterdir())
    argv = [
        "python", "-m", "jobs.train",
        *sets(["ray.address=auto", *SMALL_RUN, f"data.path={prepared_data}",
               f"ray.storage_path={storage}", f"train.run_name={run_name}", "train.max_steps=ten"]),
    ]
    job_id = local_cluster.job_client().submit_job(
        entrypoint=shlex.join(argv), runtime_env=local_cluster.runtime_env()
    )
    status, logs = local_cluster.wait_for_job(job_id, timeout=300)
    assert status == JobStatus.FAILED, logs[-4000:]
    assert "train.max_steps='ten' must be an integer" in logs, logs[-4000:]
    assert not storage.exists(), f"a failed job wrote {sorted(storage.rglob('*'))}"
    assert sorted(p.name for p in prepared_data.iterdir()) == before
    assert mlflow_run(local_cluster, run_name)[1] is None, "a failed job left an MLflow run"


def test_stop_leaves_nothing_of_ours_running(local_cluster):
    local_cluster.remember_pids()
    assert local_cluster.seen, "no processes were recorded"
    started = time.monotonic()
    out = local_cluster.stop()
    print(f"stop_local.sh: {time.monotonic() - started:.1f} s")
    assert out.returncode == 0, out.stdout + out.stderr
    # A killed process stays a zombie until its parent (here PID 1) reaps it.
    deadline = time.monotonic() + 15
    while local_cluster.our_leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not local_cluster.our_leftovers()
    assert not local_cluster.open_ports(), "ports still answer"
    for f in ("ray.pgid", "mlflow.pid", "node-1.pgid", "env"):
        assert not (local_cluster.state_dir / f).exists(), f"{f} was left behind"
