"""Ending a local Ray leaves none of its processes behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from gptdist.ray_session import end_processes_of_raylet, local_raylet_pid, processes_of_raylet, shutdown_ray, start_local_ray

pytestmark = pytest.mark.usefixtures("own_ray")  # its tests start and stop Rays of their own


def sleeper(raylet_pid: int) -> subprocess.Popen:
    env = {**os.environ, "RAY_RAYLET_PID": str(raylet_pid)}
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)


def test_end_processes_of_raylet_kills_that_raylets_processes_only():
    """A process left by a raylet that is gone (as a Ray Train controller
    once was, polling for minutes) is killed; another raylet's is not."""
    left_behind, other = sleeper(999_999_001), sleeper(999_999_002)
    try:
        time.sleep(0.2)  # the children's environments are readable once they run
        killed = end_processes_of_raylet(999_999_001)
        assert killed == [left_behind.pid]
        assert left_behind.wait(timeout=10) != 0
        assert other.poll() is None
    finally:
        for p in (left_behind, other):
            p.kill()
            p.wait()


def test_shutdown_ray_leaves_no_process_of_its_node():
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raylet_pid = local_raylet_pid()

    @ray.remote
    class Worker:
        def pid(self) -> int:
            return os.getpid()

    actor_pid = ray.get(Worker.remote().pid.remote())
    assert actor_pid in processes_of_raylet(raylet_pid)
    shutdown_ray()
    assert processes_of_raylet(raylet_pid) == []


def test_a_local_ray_starts_no_idle_workers():
    """Ray would prestart one idle Python worker per CPU for the first
    driver, none of which a run with a job runtime_env can use: a local Ray
    of gptdist starts none (each costs a 2-core machine 1-2 s of CPU)."""
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raylet_pid = local_raylet_pid()
    try:
        time.sleep(5)  # prestarted workers would have named themselves by now
        names = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                 for pid in processes_of_raylet(raylet_pid)]
        # An empty list passes too: without prestarting, an idle Ray may have
        # no worker process at all (the test above shows the lookup finds them).
        assert not [n for n in names if n.startswith("ray::IDLE")], names
    finally:
        shutdown_ray()
