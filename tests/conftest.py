"""Fixtures shared by the tests that run real Ray, Ray Train and MLflow."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from support import (
    BLOCK,
    SESSION_DIR,
    free_port,
    start_mlflow_server,
    start_s3_server,
    stop_process_group,
    tiny_config,
    write_tiny_corpus,
)

S3_BUCKET = "gptdist-test"


# The precision probe's per-machine cache (gptdist.precision_probe): tests
# write their own, never the user's. Set before any Ray starts, so Ray
# workers inherit it.
os.environ.setdefault("GPTDIST_CACHE_DIR", str(SESSION_DIR / "cache"))


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Modules that start a Ray of their own (`own_ray`) run after the
    others, so that the shared Ray starts once; the order within each group
    and each module stays as collected."""
    own = {item.module.__name__ for item in items if "own_ray" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ in own)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray, started as `gptdist train --local` starts it
    (address="local" never joins another cluster running on the machine).
    Its dashboard serves the state API that Ray Train's placement-group
    cleaner polls: without one, every run's shutdown waits out the cleaner's
    12 s timeout.

    Modules share it: it is started by the first module that asks for it
    and stopped at the end of the session, or by `own_ray` in a module that
    needs a Ray of its own (then the next module that asks starts it
    again). Each start costs a 2-core machine 10-15 s of CPU (the dashboard's
    processes, Ray Data's per-session actors)."""
    ensure_shared_ray()
    yield


def ensure_shared_ray() -> None:
    import ray

    from gptdist.ray_session import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4)


@pytest.fixture(scope="module")
def own_ray():
    """For a module that starts a Ray of its own (with other settings or
    environment): the shared one is stopped first."""
    from gptdist.ray_session import shutdown_ray

    shutdown_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def stop_ray_at_the_end():
    yield
    from gptdist.ray_session import shutdown_ray

    shutdown_ray()  # a no-op when no Ray is running


@pytest.fixture(scope="module")
def tiny_dataset(prepared_tiny_dataset, ray_local) -> Path:
    """The tiny dataset, and the module's Ray to train on it."""
    return prepared_tiny_dataset


@pytest.fixture(scope="session")
def prepared_tiny_dataset(tmp_path_factory) -> Path:
    """About 60 rows of 64+1 tokens prepared by the real pipeline, once for
    the whole session (in a Ray of its own when none is running)."""
    from data_pipeline.prepare import prepare_dataset

    corpus = write_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset([str(corpus)], out, block_size=BLOCK, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, prepared_tiny_dataset) -> tuple[Path, dict]:
    """The uninterrupted 2-worker nano run (6 steps, checkpoints at 2, 4
    and 6, the rows of each step audited) that the resume, fault and
    accumulation tests must reproduce: trained once for the session on the
    shared Ray. Its folder and summary; a test that would change them works
    on a copy."""
    from gptdist.driver import train_main
    from gptdist.fault_injection import FaultHooks

    ensure_shared_ray()
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tmp, prepared_tiny_dataset, "reference", "ray.num_workers=2", "train.checkpoint_interval=2")
    return tmp, train_main(cfg, hooks=FaultHooks(audit_dir=str(tmp / "audit")))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1, stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3 API (`moto_server`) on 127.0.0.1 with an empty bucket;
    yields the bucket's URI, `s3://gptdist-test`. For the module, the
    standard AWS_* variables point pyarrow at it (restored afterwards), so
    a Ray must be started after this fixture for its workers to see them."""
    import pyarrow.fs as pafs

    root = tmp_path_factory.mktemp("s3-server")
    port = free_port()
    proc = start_s3_server(root, port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           # the machine's own settings would override ours
           "AWS_ENDPOINT_URL_S3": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_REGION": None}
    saved = {k: os.environ.get(k) for k in env}
    try:
        set_env(env)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        set_env(saved)
        stop_process_group(proc)


def set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
