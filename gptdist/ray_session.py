"""The Ray a command runs on: a local Ray of its own, bound to 127.0.0.1,
or the cluster it joins; where Ray keeps its logs; whether it has GPUs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

import ray

from gptdist import console
from gptdist.config import Config


def connect_ray(cfg: Config, force_local: bool = False, include_dashboard: bool = True) -> bool:
    """Start or join Ray; returns True when this call started it.

    `local` starts Ray in-process, unless the process runs inside a Ray job
    (RAY_ADDRESS is set and --local was not given): then it joins the
    cluster it was submitted to, so the same command works under
    `ray job submit`. A local Ray gets a dashboard (on 127.0.0.1) unless
    asked not to: Ray Train's and Tune's placement-group cleanup use its
    state API."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address
    if address == "local" and os.environ.get("RAY_ADDRESS") and not force_local:
        address = "auto"
    started = time.monotonic()
    if address == "local":
        # One more logical CPU than cores leaves Ray Data a slot beside the
        # training workers; without it Ray Data can stall.
        num_cpus = cfg.ray.local_num_cpus or (os.cpu_count() or 1) + 1
        print(f"starting a local Ray ({num_cpus} CPUs) ...", flush=True)
        start_local_ray(num_cpus, include_dashboard)
    else:
        check_address_reachable(address)
        print(f"joining Ray at {address} ...", flush=True)
        try:
            ray.init(address=None if address == "auto" else address, logging_level=ray_logging_level())
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"cannot connect to Ray at ray.address={address!r}: {e}") from None
    print(f"Ray ready in {time.monotonic() - started:.1f} s; its logs: {ray_log_folder()}", flush=True)
    return True


def ray_logging_level() -> int:
    """Ray's driver-side INFO lines ("Started a local Ray instance", ...)
    only with --verbose; `ray.init` resets the "ray" logger to this level."""
    return logging.INFO if console.verbose() else logging.WARNING


def ray_log_folder() -> str:
    """Where this Ray keeps every process's log (on the head for a cluster).
    Ray has no public call for it; the node object knows."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else "the Ray head's /tmp/ray/session_latest/logs"


# Two helpers a local Ray of one node only pays for (each a Python process:
# 1-2 s of CPU at every start, measured on a 2-core VM), set unless the
# environment says otherwise:
# - Ray prestarts one idle worker per CPU for the first driver, but the job
#   runtime_env below makes every worker a new process, so none is used;
# - Ray Train's preemption watcher polls for nodes being drained, which a
#   single machine never is (Train passes the driver's value on to its
#   controller).
LOCAL_RAY_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_local_ray(num_cpus: int, include_dashboard: bool = True, log_to_driver: bool = True) -> None:
    """A new Ray of this process's own on this machine, with `num_cpus`
    logical CPUs and (unless asked not to) a dashboard on 127.0.0.1."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    dashboard_port = None
    if include_dashboard:
        # The state API finds the dashboard through RAY_API_SERVER_ADDRESS, else
        # through the machine's latest Ray: another one when several run here.
        dashboard_port = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    with loopback_only_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=dashboard_port, runtime_env={"env_vars": env},
                 log_to_driver=log_to_driver, logging_level=ray_logging_level())


def shutdown_ray() -> None:
    """`ray.shutdown()`; when this process started the node (a local Ray,
    not a cluster it joined), then end the node's processes that outlived it.

    Ray's workers exit when their raylet goes, but not always: after one
    shutdown in about a dozen a Ray Train controller lived on, re-parented
    to init and polling a raylet that was gone, for as long as anyone
    watched. Ray has no call to reap such processes, hence this."""
    raylet_pid = local_raylet_pid()
    ray.shutdown()
    if raylet_pid is not None:
        end_processes_of_raylet(raylet_pid)


def local_raylet_pid() -> int | None:
    """The pid of the raylet this process started, if it started one."""
    node = getattr(ray._private.worker, "_global_node", None)
    raylets = node.all_processes.get("raylet", []) if node is not None else []
    return raylets[0].process.pid if raylets else None


def processes_of_raylet(raylet_pid: int) -> list[int]:
    """Every process started by the raylet `raylet_pid` (each carries
    RAY_RAYLET_PID in its environment), this one excepted. Linux only:
    elsewhere none."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def end_processes_of_raylet(raylet_pid: int) -> list[int]:
    """SIGKILL the processes of the raylet `raylet_pid`; the pids killed."""
    killed = []
    for pid in processes_of_raylet(raylet_pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@contextlib.contextmanager
def loopback_only_node():
    """While Ray starts a node here, make its address 127.0.0.1, so that
    everything it listens on (GCS, raylet and worker gRPC, the agents, the
    metrics endpoints) listens on loopback only.

    Ray 2.60 has no listen-address setting: it replaces a loopback
    `_node_ip_address` with the machine's address and then binds every
    interface. Only with clusters disabled, as Ray does on laptops
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), is the node's address the loopback
    one. The variable reaches the processes the node starts through the
    environment; this process read it when ray was imported, hence the
    constant. Both are restored once the node runs, so that a later
    `ray.init(address=...)` of this process can join a real cluster."""
    from ray._private import ray_constants

    saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_address_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init retries an unreachable GCS for minutes; a TCP probe says
    the same in seconds. Only for explicit host:port addresses."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot connect to Ray at ray.address={address!r}: {e}") from None


def use_gpu(cfg: Config) -> bool:
    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.ray.use_gpu == "true"


def storage_path(cfg: Config) -> str:
    """Ray needs an absolute local path; URIs (s3://, gs://) pass through."""
    path = cfg.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())
