"""Fixtures that start real processes: a local gptdist cluster (Ray head
with the Jobs API, MLflow server) made by the cluster/ scripts, in a
temporary state folder on ports of its own, so it never meets a cluster
someone else runs on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

# A loaded 2-core machine: starting Ray and MLflow took 12-45 s here.
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


def free_ports(n: int) -> list[int]:
    """n distinct free ports from the kernel's ephemeral range, clear of
    Ray's default worker ports (10002-19999)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value
    return env


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_start(pid: int) -> int | None:
    """The start time of a live process (None: gone, or a zombie waiting
    for its parent to reap it). With the PID it names one process, even
    after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


@dataclass
class LocalCluster:
    state_dir: Path
    ports: dict[str, int]
    script_env: dict[str, str]
    client_env: dict[str, str] = field(default_factory=dict)
    # Every process seen in one of our process groups: PID -> start time.
    seen: dict[int, int] = field(default_factory=dict)
    job_timeout_s: float = JOB_TIMEOUT_S

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def token(self) -> str:
        return (self.state_dir / "auth_token").read_text().strip()

    def run_script(self, name: str, *args: str, env: dict | None = None, timeout: float = START_TIMEOUT_S):
        return subprocess.run(
            [str(CLUSTER / name), *args], cwd=REPO, env={**self.script_env, **(env or {})},
            capture_output=True, text=True, timeout=timeout,
        )

    def start(self) -> None:
        out = self.run_script("start_local.sh")
        assert out.returncode == 0, f"start_local.sh failed:\n{out.stdout}\n{out.stderr}"
        self.client_env = read_env_file(self.state_dir / "env")
        self.remember_pids()

    def pgid_files(self) -> list[Path]:
        return [*self.state_dir.glob("*.pgid"), self.state_dir / "mlflow.pid"]

    def member_pids(self) -> set[int]:
        """The PIDs now in the process groups we started."""
        pids = set()
        for f in self.pgid_files():
            if f.exists():
                out = subprocess.run(
                    [sys.executable, str(CLUSTER / "local_processes.py"), "members", f.read_text().strip()],
                    capture_output=True, text=True, check=True,
                ).stdout
                pids |= {int(line.split()[0]) for line in out.splitlines()}
        return pids

    def remember_pids(self) -> None:
        """Note the PIDs of every group we started (the stop check uses them)."""
        for pid in self.member_pids():
            start = proc_start(pid)
            if start is not None:
                self.seen.setdefault(pid, start)

    def env_for_clients(self) -> dict[str, str]:
        """This process's environment, pointed at the cluster only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "GPTDIST_"))}
        return {**env, **self.client_env, "GPTDIST_CLUSTER_DIR": str(self.state_dir)}

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        # An explicit Authorization header works whatever RAY_AUTH_MODE this
        # test process has (Ray reads that once, at import).
        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def runtime_env(self) -> dict:
        env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
        env["working_dir"] = str(REPO)
        return env

    def wait_for_job(self, job_id: str, timeout: float = JOB_TIMEOUT_S):
        from ray.job_submission import JobStatus

        client = self.job_client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                return status, client.get_job_logs(job_id)
            self.remember_pids()
            time.sleep(2)
        client.stop_job(job_id)
        return JobStatus.RUNNING, client.get_job_logs(job_id)

    def our_leftovers(self) -> list[str]:
        """Processes of ours still alive: seen PIDs, and any Ray daemon or
        MLflow server on our ports (found by command line)."""
        left = [f"{pid}: {proc_cmdline(pid)[:160]}" for pid, start in sorted(self.seen.items())
                if proc_start(pid) == start]
        gcs = self.ports["gcs"]
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or proc_start(int(d.name)) is None:
                continue
            cmd = proc_cmdline(int(d.name))
            if (
                (f"--gcs_server_port={gcs}" in cmd)
                or ("raylet" in cmd and f":{gcs} " in cmd + " ")
                or ("mlflow" in cmd and f"--port {self.ports['mlflow']}" in cmd)
            ) and int(d.name) not in self.seen:
                left.append(f"{d.name}: {cmd[:160]}")
        return left

    def open_ports(self) -> list[str]:
        return [f"{name}:{port}" for name, port in self.ports.items() if port_open(port)]

    def stop(self):
        self.remember_pids()
        return self.run_script("stop_local.sh", timeout=120)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    names = ["gcs", "dashboard", "client", "agent", "mlflow"]
    ports = dict(zip(names, free_ports(len(names))))
    state_dir = tmp_path_factory.mktemp("runs") / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "GPTDIST_"))}
    env.update(
        GPTDIST_CLUSTER_DIR=str(state_dir),
        GPTDIST_RAY_PORT=str(ports["gcs"]),
        GPTDIST_DASHBOARD_PORT=str(ports["dashboard"]),
        GPTDIST_RAY_CLIENT_PORT=str(ports["client"]),
        GPTDIST_DASHBOARD_AGENT_PORT=str(ports["agent"]),
        GPTDIST_MLFLOW_PORT=str(ports["mlflow"]),
        # 2 cores here: 2 logical CPUs on the head, 1 for a training worker
        # and 1 left for Ray Data.
        GPTDIST_RAY_NUM_CPUS="2",
    )
    cluster = LocalCluster(state_dir, ports, env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text file: three of the embedded plays, some 90k tokens."""
    from data_pipeline.sources import shakespeare_files

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n\n".join(p.read_text() for p in shakespeare_files()[:3]))
    return path


@pytest.fixture(scope="module")
def prepared_data(local_cluster, corpus, tmp_path_factory) -> Path:
    """The corpus prepared by a `prepare_data` job, submitted with
    cluster/submit.sh (the `ray job submit` CLI)."""
    out = tmp_path_factory.mktemp("data") / "plays"
    result = subprocess.run(
        [str(CLUSTER / "submit.sh"), "prepare_data", "--out", str(out), "--source", str(corpus)],
        cwd=REPO, env=local_cluster.env_for_clients(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, f"prepare_data job failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
    assert "succeeded" in result.stdout
    assert (out / "manifest.json").is_file(), sorted(p.name for p in out.parent.iterdir())
    return out
