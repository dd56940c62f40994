"""Fixtures shared by the tests that run real Ray, Ray Train and MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from support import BLOCK, free_port, start_mlflow_server, stop_process_group


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray of its own, started as `gptdist train --local` starts
    it (address="local" never joins another cluster running on the machine).
    Its dashboard serves the state API that Ray Train's placement-group
    cleaner polls: without one, every run's shutdown waits out the cleaner's
    12 s timeout."""
    from gptdist.trainer import start_local_ray

    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dataset(prepared_tiny_dataset, ray_local) -> Path:
    """The tiny dataset, and the module's Ray to train on it."""
    return prepared_tiny_dataset


@pytest.fixture(scope="session")
def prepared_tiny_dataset(tmp_path_factory) -> Path:
    """About 60 rows of 64+1 tokens prepared by the real pipeline, once for
    the whole session (in a Ray of its own when none is running)."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources import shakespeare_files

    corpus = tmp_path_factory.mktemp("corpus")
    paragraphs = shakespeare_files()[0].read_text()[:40_000].split("\n\n")
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text("\n\n".join(paragraphs[i::12]))
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset([str(corpus)], out, block_size=BLOCK, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1, stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)
