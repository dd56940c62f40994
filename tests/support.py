"""Helpers shared by the tests that run real Ray, Ray Train and MLflow
(fixtures live in conftest.py; a module of its own so that test files can
import these without clashing with tests/e2e/conftest.py)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BLOCK = 64  # small blocks: a test epoch is a handful of steps

# What the whole test session shares (the probes' cache, the MLflow store
# template); conftest.py removes it when the session ends.
SESSION_DIR = Path(tempfile.mkdtemp(prefix="gptdist-tests-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)


def start_s3_server(root: Path, port: int) -> subprocess.Popen:
    """A real S3 API (`moto_server`, in memory) on 127.0.0.1:`port`, its
    log in `root`; returns once it answers."""
    log = root / "s3-server.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except urllib.error.HTTPError:  # any answer means it serves
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_process_group(proc)
                raise RuntimeError("moto_server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.2)


def write_tiny_corpus(folder: Path) -> Path:
    """12 small text files cut from the first 40,000 characters of a play:
    about 60 rows of 64+1 tokens once prepared."""
    from data_pipeline.sources import shakespeare_files

    paragraphs = shakespeare_files()[0].read_text()[:40_000].split("\n\n")
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(paragraphs[i::12]))
    return folder


def stop_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


# For runs whose subject is not the data path (tracking, secrets, bad input,
# the precision probe, the non-finite stop): each worker reads its rows
# from the shards itself, the same rows Ray Data would give it. Ray Data
# ingest is what test_ingest, test_training, test_object_storage, the
# fault tests and the CLI tests train on; leaving its reader actors out of
# the other runs saves each run 6-8 s of process starts on 2 cores.
DIRECT_INGEST = "data.ingest=direct"


@functools.cache
def store_template() -> Path:
    """A SQLite store MLflow created (its tables) once for the test session."""
    from mlflow.tracking import MlflowClient

    template = SESSION_DIR / "store-template" / "mlflow.db"
    template.parent.mkdir()
    MlflowClient(f"sqlite:///{template}").search_experiments()
    return template


def sqlite_store(tmp: Path) -> str:
    """The URI of an MLflow SQLite store at `tmp`/mlflow.db. A new store
    costs 2-4 s of CPU in MLflow's schema migrations, so a missing one is
    copied from a store MLflow created once for the test session. Tests of
    creating a store (tests/test_tracking.py) pass a new file's URI instead."""
    database = tmp / "mlflow.db"
    if not database.exists():
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store_template(), database)
    return f"sqlite:///{database}"


def tiny_config(tmp: Path, data: Path, name: str, *extra: str, uri: str | None = None):
    """A nano-model run on the tiny dataset, all state under `tmp`."""
    from gptdist.config import load_config

    uri = uri or sqlite_store(tmp)
    return load_config(overrides=[
        "model.preset=nano", f"model.block_size={BLOCK}", f"data.path={data}",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=6",
        "train.learning_rate=0.003", "train.warmup_steps=1", "train.log_interval=1",
        "train.eval_interval=3", "train.eval_batches=2", "train.checkpoint_interval=3",
        "train.sample_tokens=8", f"train.run_name={name}", "train.precision=fp32",
        # A fixed MFU denominator: the matmul probe costs each worker about
        # 2 s per run. tests/test_tracking.py measures it where it checks MFU.
        "train.cpu_peak_flops=1.0e+11",
        f"ray.storage_path={tmp / 'ray'}", f"tracking.uri={uri}",
        f"tracking.runs_dir={tmp}", *extra,
    ])


def wait_for(predicate, timeout_s: float = 300, what: str = "condition"):
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def audited_rows(audit_dir: Path) -> dict[int, list[int]]:
    """Rows trained at each step; a step retried after a failure keeps the
    rows of its last attempt (the earlier attempt's update was rolled back)."""
    by_step: dict[int, dict[int, list[int]]] = {}
    for path in sorted(audit_dir.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {})[rec["rank"]] = rec["rows"]
    return {step: sorted(r for rows in ranks.values() for r in rows) for step, ranks in by_step.items()}


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    found, grew = {pid}, True
    while grew:
        new = {child for child, ppid in parent.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return found


def listening_sockets(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of each TCP socket these processes
    listen on, as `ss -ltnp` reports them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((address.strip("[]"), int(port), name))
    return found


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


class FixedMeasure:
    """Stands in for a probe's measuring function (precision_probe's
    measure_precisions, attention_probe's measure_attention): returns the
    pair of figures it was given, whatever it is asked, and counts calls."""

    def __init__(self, first: float, second: float):
        self.figures, self.calls = (first, second), 0

    def __call__(self, _what) -> tuple[float, float]:
        self.calls += 1
        return self.figures
