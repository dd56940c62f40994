"""Turn the `--from` argument of sample / eval / export into a checkpoint folder.

Accepted, tried in this order:
    a path        a checkpoint folder (has meta.json), or a Ray Train run
                  folder holding `checkpoint_*` subfolders: the complete one
                  with the highest step is taken
    a URI         the same in object storage (`s3://bucket/runs/ray/<name>`)
    runs:/<id>[/<artifact-path>]
                  the artifact folder (default `model`) of that MLflow run
    a run name    the latest MLflow run of that name in tracking.experiment
                  that logged a `model` artifact; failing that, the Ray
                  checkpoints under {ray.storage_path}/{name}/ (a path or a URI)

Downloads are cached under {tracking.runs_dir}/downloads/: MLflow
artifacts in <run-id>/, checkpoints from object storage in
<scheme>/<bucket>/<key>/ (fetched again when their meta.json changed). Each
is written to a temporary folder first and renamed into place, so an
interrupted download is never mistaken for a checkpoint.

`load_inference_state` / `load_inference_model` then load the weights for
sample, eval and export, checking that model.pt has the shape meta.json
declares, so a mismatched checkpoint is a clear error naming both shapes
rather than a wall of load_state_dict size mismatches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline import storage
from gptdist.checkpoint import (
    META_FILE,
    CheckpointError,
    check_shape,
    load_model_state,
    model_config_from_meta,
    read_meta,
)
from gptdist.config import Config
from gptdist.model import GPT, GPTConfig

RUNS_SCHEME = "runs:/"
# Ray Train's record of a run's registered checkpoints, in the run folder.
RAY_SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"
DEFAULT_ARTIFACT_PATH = "model"  # where training logs its final checkpoint folder


def _tracking():
    """gptdist.tracking, imported on first use: it imports MLflow, which a
    local checkpoint folder never needs and which `gptdist sample` would
    otherwise wait for at start-up."""
    from gptdist import tracking

    return tracking


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    run_id: str | None  # the MLflow training run, when known
    origin: str  # how the source was found, for messages


def resolve_checkpoint(source: str, cfg: Config) -> Path:
    return resolve_source(source, cfg).path


def resolve_source(source: str, cfg: Config) -> ResolvedCheckpoint:
    if source.startswith(RUNS_SCHEME):
        return _from_runs_uri(source, cfg)
    if storage.is_uri(source) and not source.startswith("file://"):
        return _from_storage_uri(storage.normalize(source), cfg)
    path = Path(source.removeprefix("file://")).expanduser()
    if path.exists():
        return _from_local_path(path)
    if "/" in source or source.startswith("."):
        raise CheckpointError(f"no checkpoint folder at {path}")
    return _from_run_name(source, cfg)


# --- local folders ----------------------------------------------------------


def _from_local_path(path: Path) -> ResolvedCheckpoint:
    if (path / META_FILE).is_file():
        meta = read_meta(path)
        return ResolvedCheckpoint(path, meta.get("mlflow_run_id"), f"checkpoint folder {path}")
    if path.is_dir() and checkpoint_folders(path):
        folder = latest_ray_checkpoint(path)
        return ResolvedCheckpoint(folder, read_meta(folder).get("mlflow_run_id"), f"Ray run {path}")
    raise CheckpointError(
        f"{path} is neither a checkpoint folder ({META_FILE} missing) "
        "nor a Ray Train run folder (no checkpoint_* subfolders)"
    )


def checkpoint_folders(run_dir: str | Path) -> list:
    """Ray Train's `checkpoint_*` folders of a run, in name order (the
    run folder also holds `checkpoint_manager_snapshot.json`): Paths for a
    local run folder, URIs for one in object storage."""
    if not storage.is_uri(storage.normalize(run_dir)):
        return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())
    return [storage.join(run_dir, name) for name in storage.list_folders(run_dir)
            if name.startswith("checkpoint_")]


def latest_ray_checkpoint(run_dir: str | Path):
    """A run's latest checkpoint, the one `train` resumes from and `sample`,
    `eval` and `export` load (a Path, or a URI in object storage).

    Ray Train resumes from the latest checkpoint its checkpoint-manager
    snapshot records. When that folder is complete, it is the latest. When
    it is not (its meta.json is missing or unreadable: a write cut short, a
    folder damaged later), the newest complete folder before it is, and the
    training worker loads that one instead of Ray's (train_loop.restore).
    Without a snapshot: the complete folder with the highest step."""
    candidates = []
    for folder in checkpoint_folders(run_dir):
        try:
            meta = read_meta(folder)
        except CheckpointError:
            continue
        candidates.append((int(meta.get("step", -1)), str(folder).rsplit("/", 1)[-1], folder))
    registered = ray_latest_checkpoint_name(run_dir)
    if registered is not None:
        # The newest complete folder at or before Ray's latest: Ray's own
        # when complete; an unregistered later folder is never taken.
        candidates = [c for c in candidates if c[1] <= registered]
    if not candidates:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint_* folder")
    return max(candidates)[2]


def ray_latest_checkpoint_name(run_dir: str | Path) -> str | None:
    """The folder name of the latest checkpoint in Ray Train's snapshot of
    the run (None without a snapshot, or one this code cannot read)."""
    snapshot = storage.join(str(run_dir), RAY_SNAPSHOT_NAME)
    try:
        if not storage.is_file(snapshot):
            return None
        latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return latest.get("checkpoint_dir_name")


def resume_step(run_dir: str | Path) -> int:
    """The step Ray Train's workers resume the run at: that of the latest
    checkpoint its snapshot records (or of the complete one before it, see
    `latest_ray_checkpoint`). Without a snapshot Ray Train starts the run
    afresh, even when a checkpoint folder was written but not yet
    registered (a worker that died right after its report): step 0."""
    if ray_latest_checkpoint_name(run_dir) is None:
        return 0
    try:
        return int(read_meta(latest_ray_checkpoint(run_dir))["step"])
    except CheckpointError:
        return 0


# --- object storage ---------------------------------------------------------


def _from_storage_uri(uri: str, cfg: Config) -> ResolvedCheckpoint:
    try:
        if storage.is_file(storage.join(uri, META_FILE)):
            folder, origin = uri, f"checkpoint folder {uri}"
        elif checkpoint_folders(uri):
            folder, origin = latest_ray_checkpoint(uri), f"Ray run {uri}"
        elif storage.exists(uri):
            raise CheckpointError(
                f"{uri} is neither a checkpoint folder ({META_FILE} missing) "
                "nor a Ray Train run folder (no checkpoint_* subfolders)"
            )
        else:
            raise CheckpointError(f"no checkpoint folder at {uri}")
        local = download_storage_checkpoint(cfg, folder)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    return ResolvedCheckpoint(local, read_meta(local).get("mlflow_run_id"), origin)


def download_storage_checkpoint(cfg: Config, uri: str) -> Path:
    """A checkpoint folder in object storage, on local disk. A cached copy
    is reused while its meta.json equals the stored one (Ray names a
    checkpoint folder once, but a run folder may be deleted and reused)."""
    scheme, _, key = uri.partition("://")
    cache = _tracking().runs_dir(cfg.tracking) / "downloads" / scheme / key
    if (cache / META_FILE).is_file() and (cache / META_FILE).read_bytes() == storage.read_bytes(
            storage.join(uri, META_FILE)):
        return cache

    def fetch(tmp: Path) -> Path:
        storage.copy_folder(uri, tmp / "checkpoint")
        return tmp / "checkpoint"

    return _download_once(cache, fetch)


def _download_once(cache: Path, fetch: Callable[[Path], Path]) -> Path:
    """Fill `cache` with the checkpoint folder `fetch(tmp)` downloads into
    a temporary sibling folder, renamed into place once complete."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache.parent))
    try:
        got = fetch(tmp)
        if cache.exists():  # an incomplete or outdated earlier download
            shutil.rmtree(cache)
        Path(got).rename(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    read_meta(cache)  # a folder holding something other than a checkpoint
    return cache


# --- MLflow -----------------------------------------------------------------


def _client(cfg: Config):
    tracking = _tracking()
    return tracking.mlflow_client(tracking.tracking_uri(cfg.tracking))


def _store_exists(uri: str) -> bool:
    """Opening a SQLite URI creates the database; a lookup by run name must
    not leave an empty store behind when there is none yet."""
    database = _tracking().sqlite_database(uri)
    return database is None or database.is_file()


def _from_runs_uri(source: str, cfg: Config) -> ResolvedCheckpoint:
    rest = source[len(RUNS_SCHEME) :].strip("/")
    run_id, _, artifact_path = rest.partition("/")
    if not run_id:
        raise CheckpointError(f"{source!r}: expected runs:/<run-id>[/<artifact-path>]")
    uri = _tracking().tracking_uri(cfg.tracking)
    if not _store_exists(uri) or not _run_exists(cfg, run_id):
        raise CheckpointError(f"MLflow run {run_id!r} not found at tracking URI {uri}")
    artifact_path = artifact_path or DEFAULT_ARTIFACT_PATH
    folder = download_run_artifact(cfg, run_id, artifact_path)
    return ResolvedCheckpoint(folder, run_id, f"MLflow run {run_id} artifact {artifact_path!r}")


def _run_exists(cfg: Config, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client(cfg).get_run(run_id)
    except MlflowException:
        return False
    return True


def _has_artifact(cfg: Config, run_id: str, artifact_path: str) -> bool:
    parent, _, name = artifact_path.rpartition("/")
    listed = _client(cfg).list_artifacts(run_id, parent or None)
    return any(f.path == artifact_path and f.is_dir for f in listed)


def download_run_artifact(cfg: Config, run_id: str, artifact_path: str) -> Path:
    """The run's artifact folder on local disk, downloaded once."""
    import mlflow.artifacts

    uri = _tracking().tracking_uri(cfg.tracking)
    if not _has_artifact(cfg, run_id, artifact_path):
        raise CheckpointError(
            f"MLflow run {run_id} at {uri} has no artifact folder {artifact_path!r} "
            "(did the training run finish and log its checkpoint?)"
        )
    cache = _tracking().runs_dir(cfg.tracking) / "downloads" / run_id / artifact_path
    if (cache / META_FILE).is_file():
        return cache
    with _no_artifact_progress_bars():
        return _download_once(cache, lambda tmp: Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{RUNS_SCHEME}{run_id}/{artifact_path}", tracking_uri=uri, dst_path=str(tmp))))


@contextlib.contextmanager
def _no_artifact_progress_bars():
    """MLflow draws a tqdm bar per download, carriage returns and all, into
    the stderr of `sample` and `eval` (and into logs, where it is noise).
    Off for the download unless the user set the variable themselves."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def find_run_by_name(cfg: Config, name: str) -> str | None:
    """Id of the latest run called `name` in tracking.experiment that logged
    a model; eval runs are skipped."""
    if not _store_exists(_tracking().tracking_uri(cfg.tracking)):
        return None
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    quote = '"' if "'" in name else "'"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.runName = {quote}{name}{quote}",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.data.tags.get(_tracking().RUN_KIND_TAG) == "eval":
            continue
        if _has_artifact(cfg, run.info.run_id, DEFAULT_ARTIFACT_PATH):
            return run.info.run_id
    return None


def _from_run_name(name: str, cfg: Config) -> ResolvedCheckpoint:
    run_id = find_run_by_name(cfg, name)
    if run_id is not None:
        folder = download_run_artifact(cfg, run_id, DEFAULT_ARTIFACT_PATH)
        return ResolvedCheckpoint(folder, run_id, f"MLflow run {name!r} ({run_id})")
    ray_dir = storage.join(storage.normalize(cfg.ray.storage_path), name)
    if storage.is_uri(ray_dir):
        try:
            found = bool(checkpoint_folders(ray_dir))
        except storage.StorageError as e:
            raise CheckpointError(str(e)) from None
        if found:
            return _from_storage_uri(ray_dir, cfg)
    elif Path(ray_dir).is_dir():
        folder = latest_ray_checkpoint(Path(ray_dir))
        return ResolvedCheckpoint(
            folder, read_meta(folder).get("mlflow_run_id"), f"Ray run {ray_dir}"
        )
    raise CheckpointError(
        f"no checkpoint named {name!r}: no MLflow run of that name with a "
        f"{DEFAULT_ARTIFACT_PATH!r} artifact in experiment {cfg.tracking.experiment!r} "
        f"at {_tracking().tracking_uri(cfg.tracking)}, and no Ray run folder {ray_dir}"
    )


# --- loading for inference --------------------------------------------------


def weights_shape(state: dict[str, torch.Tensor], declared: GPTConfig) -> GPTConfig:
    """The shape the tensors in model.pt actually have. n_head leaves no
    trace in the weights, so the declared one is kept."""
    try:
        wte = state["transformer.wte.weight"]
        wpe = state["transformer.wpe.weight"]
    except KeyError as e:
        raise CheckpointError(f"model.pt holds no GPT weights (missing {e})") from None
    layers = {k.split(".")[2] for k in state if k.startswith("transformer.h.")}
    return dataclasses.replace(
        declared,
        n_layer=len(layers),
        n_embd=wte.shape[1],
        vocab_size=wte.shape[0],
        block_size=wpe.shape[0],
        bias="transformer.ln_f.bias" in state,
    )


def load_inference_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, dict[str, Any]]:
    """(verified state_dict, model shape, meta) of a checkpoint folder."""
    state, meta = load_model_state(folder)
    try:
        declared = model_config_from_meta(meta)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{META_FILE} has no valid model shape: {e}") from None
    # check_shape words it "checkpoint X vs model Y": here X is what
    # meta.json declares, Y what model.pt holds.
    check_shape(weights_shape(state, declared), meta, f"{folder} (meta.json vs model.pt)")
    return state, declared, meta


def load_inference_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    state, config, meta = load_inference_state(folder)
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: model.pt does not fit a GPT of the declared shape: {e}") from None
    return model.to(device).eval(), meta
