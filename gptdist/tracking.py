"""MLflow tracking: where runs are stored and the coordinator that logs them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: SQLite stores are opened without a lock
    fcntl = None

import mlflow
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gptdist.config import REPO_ROOT, Config, TrackingConfig, flatten
from gptdist.redaction import redact_text, redact_uri


def runs_dir(tracking: TrackingConfig) -> Path:
    """The project's runs folder (relative paths are against the current
    directory, absolute ones as given)."""
    return Path(tracking.runs_dir).resolve()


def tracking_uri(tracking: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an embedded SQLite store
    under the runs folder. Always explicit: MLflow's own default follows the
    working directory, which inside a Ray worker is a session folder."""
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{runs_dir(tracking) / 'mlflow.db'}"


def artifact_root(tracking: TrackingConfig) -> str:
    """Artifact location for experiments created in an embedded SQLite store."""
    return (runs_dir(tracking) / "mlartifacts").as_uri()


# --- the run, on the driver ---------------------------------------------------


log = logging.getLogger("gptdist.tracking")

# MLflow's HTTP client retries a dead server with exponential backoff for
# minutes by default; a training run should notice in seconds and go on.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# MLflow prints "View run ... at: <tracking URI>" at the end of each run,
# the URI's credentials included; gptdist prints where to look itself,
# redacted (driver.print_summary).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

RUN_NAME_TAG = "gptdist.run_name"
RUN_KIND_TAG = "gptdist.run_kind"
PARENT_TAG = "mlflow.parentRunId"


class TrackingUnavailableError(RuntimeError):
    pass


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any Ray worker starts, when a tracking server does
    not answer. Local stores (sqlite, file) need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    request = health_request(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingUnavailableError(
                    f"MLflow tracking server {redact_uri(uri)} answered {response.status} at /health")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable: {redact_text(str(e))}") from None


def health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health; user info in the URI becomes a basic-auth header,
    as MLflow's client sends it (urllib would take it for the host)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri.rstrip("/") + "/health")
    headers = {}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urllib.request.Request(urlunsplit((parts.scheme, host, parts.path, parts.query, "")), headers=headers)


def mlflow_client(uri: str) -> MlflowClient:
    """`MlflowClient(uri)`, which opens the store: a new SQLite store gets
    its tables then, and two processes doing that at once fail in MLflow's
    schema migration ("Online migration expected to match one row", or a
    duplicate column). Under `sqlite_store_lock` they take turns."""
    with sqlite_store_lock(uri):
        return MlflowClient(uri)


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI; None for other stores."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def sqlite_store_lock(uri: str):
    """An exclusive lock on a lock file beside a SQLite store's database
    (released when the file closes); nothing for other stores (a server
    serializes its own) or without POSIX locks. MLflow has no lock of its
    own for creating a store's tables."""
    database = sqlite_database(uri)
    if database is None or fcntl is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def get_or_create_experiment(client: MlflowClient, tracking: TrackingConfig, uri: str, name: str | None = None) -> str:
    name = name or tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store would otherwise put artifacts under the working
    # directory (a Ray session folder on workers); a server chooses its own.
    location = artifact_root(tracking) + f"/{name}" if uri.startswith("sqlite:") else None
    # MLflow 3's UI opens an experiment on its GenAI overview unless told
    # the experiment is model training: then on the runs table.
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:
        # Another run created it meanwhile (first runs started together).
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def environment_tags() -> dict[str, str]:
    import ray
    import torch

    tags = {
        "gptdist.torch_version": torch.__version__,
        "gptdist.ray_version": ray.__version__,
        "gptdist.mlflow_version": mlflow.__version__,
        "gptdist.python_version": platform.python_version(),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=REPO_ROOT, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def start_or_resume_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> tuple[str, bool]:
    """The MLflow run of this run name: the existing one when the name was
    used before (a resumed run continues the same MLflow run, never a
    duplicate), else a new one. Returns (run_id, resumed)."""
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        already = existing[0].data.params
        new_params = {k: v for k, v in params.items() if k not in already}
        log_params(client, run_id, new_params)
        client.set_tag(run_id, "gptdist.resumed", "true")
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_NAME_TAG: run_name})
    log_params(client, run.info.run_id, params)
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    # Values are redacted: a URI param (tracking.uri, data.path) may carry a password.
    items = [Param(k, redact_text(json.dumps(v) if isinstance(v, (list, dict)) else str(v))) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


ERROR_TAG = "gptdist.error"
INTERRUPTED_TAG = "gptdist.interrupted"


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or the SystemExit that Ray Train's own
    SIGINT handler raises in `fit()` after aborting the run."""
    return isinstance(error, (KeyboardInterrupt, SystemExit))


def finish_run(client: MlflowClient, run_id: str, error: BaseException | None = None) -> None:
    """FINISHED (clearing the error or interruption of an earlier attempt:
    the run went on to complete), KILLED for an interruption, else FAILED
    with the error as a tag."""
    tags = client.get_run(run_id).data.tags
    if error is None:
        for key in (ERROR_TAG, INTERRUPTED_TAG):
            if key in tags:
                client.delete_tag(run_id, key)
        client.set_terminated(run_id, status="FINISHED")
        return
    if is_interruption(error):
        client.set_tag(run_id, INTERRUPTED_TAG, "interrupted (Ctrl-C / SIGINT); the same command resumes it")
        if ERROR_TAG in tags:
            client.delete_tag(run_id, ERROR_TAG)
        client.set_terminated(run_id, status="KILLED")
        return
    client.set_tag(run_id, ERROR_TAG, redact_text(f"{type(error).__name__}: {error}")[:5000])
    client.set_terminated(run_id, status="FAILED")


def last_logged_step(client: MlflowClient, run_id: str, key: str = "train/loss") -> int:
    """The highest step of `key` in the run's history (0 with none): where a
    resumed run's coordinator picks up."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def plot_loss_curve(client: MlflowClient, run_id: str, out: Path) -> Path | None:
    """Train and val loss against step, from the run's own metric history
    (so a resumed run's curve spans every attempt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for key in ("train/loss", "val/loss"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        latest = {m.step: m.value for m in history}  # a retried step keeps its last value
        if latest:
            ax.plot(list(latest), list(latest.values()), label=key, marker="." if key == "val/loss" else None)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- a training run's MLflow run ------------------------------------------------------


def open_tracking(cfg: Config, params: dict, kind: str = "train", parent_run_id: str | None = None):
    """(client, run_id, resumed), or (None, None, False) when tracking is
    optional and the server is down."""
    uri = tracking_uri(cfg.tracking)
    try:
        check_reachable(uri)
        client = mlflow_client(uri)
        experiment_id = get_or_create_experiment(client, cfg.tracking, uri)
    except Exception as e:
        if cfg.tracking.required:
            raise TrackingUnavailableError(
                f"{e} (tracking.uri / MLFLOW_TRACKING_URI = {redact_uri(uri)}; "
                "set tracking.required=false to train without it)"
            ) from None
        print(f"warning: MLflow tracking disabled for this run: {e}")
        return None, None, False
    tags = {**environment_tags(), RUN_KIND_TAG: kind}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run_id, resumed = start_or_resume_run(client, experiment_id, cfg.train.run_name, params, tags)
    return client, run_id, resumed


def run_params(cfg: Config, model_params: int, flops_per_token: int) -> dict[str, Any]:
    """The whole resolved config, flattened, plus derived values."""
    return {
        **flatten(cfg.to_dict()),
        "derived.num_params": model_params,
        "derived.flops_per_token": flops_per_token,
        "derived.global_batch_tokens": cfg.train.global_batch_size * cfg.model.block_size,
        "derived.world_size": cfg.ray.num_workers,
    }


def log_final_artifacts(cfg: Config, result, client, run_id: str) -> None:
    """The final model (loadable with `--from runs:/<id>`), the loss curve,
    and the run's FINISHED status."""
    from gptdist.checkpoint import local_checkpoint_folder  # torch: not needed by `gptdist runs`

    if result.checkpoint and cfg.tracking.log_checkpoints != "none":
        with local_checkpoint_folder(result.checkpoint) as folder:
            client.log_artifacts(run_id, folder, "model")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss_curve(client, run_id, Path(tmp) / "loss_curve.png")
        if png:
            client.log_artifact(run_id, str(png))
    finish_run(client, run_id)
