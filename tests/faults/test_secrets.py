"""What a local run exposes: credentials in URIs never reach MLflow or the
console (a real run logging to a real `mlflow server` through a URI that
carries a password), and the local Ray and the MLflow server listen on
127.0.0.1 only."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from gptdist.redaction import redact_text, redact_uri
from gptdist.tracking import TrackingUnavailableError
from gptdist.driver import train_main
from support import DIRECT_INGEST, LOOPBACK, descendants, free_port, listening_sockets, tiny_config

SECRET = "s3cret-pw"


def test_redact_uri():
    assert redact_uri(f"https://alice:{SECRET}@mlflow.example.com:5000/x") == "https://alice:***@mlflow.example.com:5000/x"
    assert redact_uri("postgresql://bob@db:5432/mlflow") == "postgresql://bob@db:5432/mlflow"  # no password
    assert redact_uri("sqlite:////abs/runs/mlflow.db") == "sqlite:////abs/runs/mlflow.db"  # untouched
    assert redact_uri(f"s3://b/k?X-Amz-Signature={SECRET}&region=eu") == "s3://b/k?X-Amz-Signature=***&region=eu"
    assert SECRET not in redact_text(f"could not reach http://a:{SECRET}@h:1/api (see http://a:{SECRET}@h:1)")


def test_an_unreachable_server_error_hides_the_password(tmp_path, prepared_tiny_dataset):
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"
    cfg = tiny_config(tmp_path, prepared_tiny_dataset, "secret-down", uri=uri)
    with pytest.raises(TrackingUnavailableError) as failure:
        train_main(cfg)
    assert "alice:***@127.0.0.1" in str(failure.value) and SECRET not in str(failure.value)


def test_a_run_through_a_uri_with_a_password_stores_no_password(tmp_path, tiny_dataset, mlflow_server, capfd,
                                                                 monkeypatch):
    """A password in the tracking URI is shown as *** everywhere; secrets in
    the environment reach neither params nor tags (params are the config,
    tags are versions and hashes)."""
    in_environment = "s3cr3t-VALUE-must-not-leak"
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "RAY_AUTH_TOKEN_X"):
        monkeypatch.setenv(name, in_environment)
    uri = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    cfg = tiny_config(tmp_path, tiny_dataset, "secret-run", "train.max_steps=2", "train.eval_interval=2",
                      "train.checkpoint_interval=2", DIRECT_INGEST, uri=uri)
    summary = train_main(cfg)
    out = capfd.readouterr()
    leaked = [line for line in (out.out + out.err).splitlines() if SECRET in line]
    assert not leaked, leaked[:5]
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://alice:***@")
    for text in [*run.data.params.values(), *run.data.tags.values()]:
        assert SECRET not in text and in_environment not in text
    config_yaml = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert SECRET not in open(config_yaml).read()


def test_a_local_ray_and_mlflow_listen_on_loopback_only(tiny_dataset, mlflow_server):
    """The module's Ray was started as `gptdist train --local` starts it
    (the run above trained on it); with a worker process up, every socket of
    it and of the MLflow server (all below this process) listens on 127.0.0.1."""
    import ray

    @ray.remote
    class Worker:
        def pid(self) -> int:
            return os.getpid()

    worker = Worker.remote()
    ray.get(worker.pid.remote())
    sockets = listening_sockets(descendants(os.getpid()))
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), sockets
    assert any(port == int(mlflow_server.rsplit(":", 1)[1]) for _, port, _ in sockets), sockets
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, exposed
    ray.kill(worker)
