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
import subprocess
import sys
import textwrap
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


def test_train_job_logs_metrics_and_model_to_the_mlflow_server(local_cluster, prepared_data, tmp_path):
    storage = tmp_path / "storage"
    run_name = "e2e-job"
    argv = [
        "python", "-m", "jobs.train",
        *sets(["ray.address=auto", *SMALL_RUN, f"data.path={prepared_data}",
               f"ray.storage_path={storage}", f"train.run_name={run_name}"]),
    ]
    client = local_cluster.job_client()
    started = time.monotonic()
    job_id = client.submit_job(entrypoint=shlex.join(argv), runtime_env=local_cluster.runtime_env())
    status, logs = local_cluster.wait_for_job(job_id)
    print(f"train job: {status} after {time.monotonic() - started:.0f} s")
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    assert f"run {run_name} finished at step 4" in logs

    # The server, not a local store, holds the run: the job found it through
    # MLFLOW_TRACKING_URI, which the runtime env took from the cluster.
    mlflow, run = mlflow_run(local_cluster, run_name)
    assert run is not None, f"no MLflow run {run_name} on {local_cluster.mlflow_url}"
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/loss"} <= set(run.data.metrics)
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert run.data.params["model.preset"] == "nano"
    model_files = {a.path for a in mlflow.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.pt", "model/meta.json"} <= model_files
    meta = json.loads(open(mlflow.download_artifacts(run.info.run_id, "model/meta.json", str(tmp_path))).read())
    assert meta["step"] == 4
    # Artifacts are in the store's artifact folder: the runs folder holding the
    # cluster's state folder, where `gptdist train --local` keeps them too.
    assert list((local_cluster.state_dir.parent / "mlartifacts").rglob("model.pt"))

    # Checkpoints are where ray.storage_path said, complete.
    checkpoints = sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "meta.json").is_file() for c in checkpoints)

    # The head, its workers, the Ray Client server and MLflow listen on
    # 127.0.0.1 only (every socket of the groups start_local.sh started).
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


# The driver of the two-node run: trains, then reports the summary and the
# nodes its Train workers ran on (from Ray's state API) as one JSON line.
TWO_NODE_DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.util.state import list_actors
    from gptdist.config import load_config
    from gptdist.driver import train_main

    cfg = load_config(None, sys.argv[1:])
    ray.init(address="auto")  # RAY_ADDRESS: the cluster's GCS
    alive_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    summary = train_main(cfg)
    job_id = ray.get_runtime_context().get_job_id()
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)],
                          detail=True, limit=1000)
    print("E2E-RESULT " + json.dumps({
        "summary": summary,
        "alive_nodes": alive_nodes,
        "worker_nodes": sorted(w.node_id for w in workers),
    }, default=str))
    """
)


def test_ddp_across_two_nodes_with_shared_checkpoint_storage(local_cluster, prepared_data, tmp_path):
    """Two Ray nodes on this machine, one DDP rank on each (SPREAD), gloo
    between them; checkpoints go to a folder both nodes see."""
    added = local_cluster.run_script("add_local_node.sh", env={"GPTDIST_NODE_NUM_CPUS": "2"})
    assert added.returncode == 0, added.stdout + added.stderr
    local_cluster.remember_pids()

    storage = tmp_path / "shared-storage"
    run_name = "e2e-two-nodes"
    overrides = [
        "ray.address=auto", *SMALL_RUN, "train.max_steps=6", "train.global_batch_size=4",
        "train.learning_rate=0.003", "ray.num_workers=2", "ray.placement_strategy=SPREAD",
        f"data.path={prepared_data}", f"ray.storage_path={storage}", f"train.run_name={run_name}",
    ]
    env = local_cluster.env_for_clients()
    env["RAY_ADDRESS"] = env["GPTDIST_RAY_GCS_ADDRESS"]
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", TWO_NODE_DRIVER, *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=local_cluster.job_timeout_s,
    )
    print(f"two-node run: exit {out.returncode} after {time.monotonic() - started:.0f} s")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("E2E-RESULT "))
    result = json.loads(line.removeprefix("E2E-RESULT "))
    summary = result["summary"]

    assert len(result["alive_nodes"]) == 2
    exposed = [s for s in listening_sockets(local_cluster.member_pids()) if s[0] not in LOOPBACK]
    assert not exposed, exposed  # the added node listens on 127.0.0.1 as well
    assert len(result["worker_nodes"]) == 2 and len(set(result["worker_nodes"])) == 2, (
        f"the two ranks did not run on two nodes: {result['worker_nodes']}"
    )
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], f"ranks disagree on the parameters: {digests}"

    mlflow, run = mlflow_run(local_cluster, run_name)
    assert run is not None and run.info.status == "FINISHED"
    assert run.data.params["ray.num_workers"] == "2"
    history = sorted(mlflow.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1].value < history[0].value, [m.value for m in history]

    assert summary["checkpoint"].startswith(str(storage / run_name))
    checkpoints = sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "meta.json").is_file() for c in checkpoints)
    assert json.loads((checkpoints[-1] / "meta.json").read_text())["step"] == 6


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
