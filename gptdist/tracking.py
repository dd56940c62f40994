"""MLflow tracking: where runs are stored and the coordinator that logs them."""

from __future__ import annotations

import os
from pathlib import Path

from gptdist.config import REPO_ROOT, TrackingConfig


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
