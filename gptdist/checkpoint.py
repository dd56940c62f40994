"""Checkpoints: one folder that holds everything needed to continue exactly.

Layout of a checkpoint folder:
    model.pt        model state_dict (plain tensors, no DDP/compile prefixes)
    train_state.pt  optimizer, GradScaler, RNG states (tensors and plain data)
    meta.json       step, tokens seen, data position, model shape, dataset
                    manifest hash, the resolved config, and the sha256 of
                    both .pt files; written last
Everything loads with `torch.load(weights_only=True)`, so a checkpoint never
unpickles arbitrary objects, and the sha256 check turns a tampered or
truncated file into an error instead of silently wrong weights. A folder
without a meta.json (a writer killed mid-way) is never taken for a
checkpoint. Reading works on a folder in object storage too (a Ray run
whose `ray.storage_path` is an `s3://` URI); writing is always local, Ray
uploads the folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs
import torch

from data_pipeline import storage
from gptdist.digest import sha256_file
from gptdist.config import ConfigError
from gptdist.model import bare_gpt
from gptdist.model_config import GPTConfig

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of the bare GPT: unwraps DDP (`module.`) and torch.compile
    (`_orig_mod.`) so checkpoints load into a plain model."""
    return {k: v.detach().cpu() for k, v in bare_gpt(model).state_dict().items()}


def save_checkpoint(
    folder: str | Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    meta: dict[str, Any],
    before_meta: Callable[[], None] | None = None,
) -> Path:
    """Write a checkpoint into `folder` (created). meta.json goes last and
    is renamed into place, so a crash leaves a folder `load` rejects.
    `before_meta` runs between the two (fault-injection tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, folder / MODEL_FILE)
    files = {MODEL_FILE: sha256_file(folder / MODEL_FILE)}
    if train_state is not None:
        torch.save(train_state, folder / STATE_FILE)
        files[STATE_FILE] = sha256_file(folder / STATE_FILE)
    if before_meta is not None:
        before_meta()
    meta = {**meta, "format_version": FORMAT_VERSION, "files": files}
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / META_FILE)
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder (a path or a URI)."""
    meta_path = storage.join(folder, META_FILE)
    try:
        if not storage.is_file(meta_path):
            raise CheckpointError(
                f"{folder} is not a complete checkpoint: {META_FILE} is missing "
                "(an interrupted write, or not a checkpoint folder)"
            )
        text = storage.read_bytes(meta_path)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format {meta.get('format_version')!r}, "
            f"this gptdist reads {FORMAT_VERSION}"
        )
    return meta


def verify_file(folder: str | Path, name: str, meta: dict[str, Any]) -> str:
    """The location of `name` in the checkpoint folder (a path or a URI),
    after checking its sha256 against meta.json."""
    path = storage.join(folder, name)
    expected = meta["files"].get(name)
    try:
        if expected is None or not storage.is_file(path):
            raise CheckpointError(f"checkpoint {folder} has no {name}")
        actual = storage.sha256(path)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    if actual != expected:
        raise CheckpointError(
            f"{path} has sha256 {actual} but {META_FILE} records {expected}: "
            "the file was altered or truncated"
        )
    return path


def _load_verified(folder: str | Path, name: str, meta: dict[str, Any]) -> Any:
    path = verify_file(folder, name, meta)
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpicklable object or a corrupt archive
        raise CheckpointError(f"{path} cannot be loaded safely (weights_only=True): {e}") from None


def load_model_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_meta(folder)
    return _load_verified(folder, MODEL_FILE, meta), meta


def load_train_state(folder: str | Path) -> dict[str, Any]:
    return _load_verified(folder, STATE_FILE, read_meta(folder))


def model_config_from_meta(meta: dict[str, Any]) -> GPTConfig:
    return GPTConfig(**meta["model"])


def check_shape(expected: GPTConfig, meta: dict[str, Any], where: str) -> None:
    """A checkpoint from another model shape is an error naming both."""
    found = model_config_from_meta(meta)
    diffs = [
        f"{k}: checkpoint {getattr(found, k)} vs model {getattr(expected, k)}"
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
        if getattr(found, k) != getattr(expected, k)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {where} is from another model shape ({'; '.join(diffs)})")


def check_resumable(meta: dict[str, Any], model: GPTConfig, global_batch_size: int, manifest_sha256: str,
                    run: str) -> None:
    """A run resumes from a checkpoint only with its model shape, global
    batch (the data position is counted in global batches) and dataset.
    The driver checks before any worker starts; each worker checks the
    checkpoint Ray Train hands it."""
    check_shape(model, meta, run)
    if meta["global_batch_size"] != global_batch_size:
        raise ConfigError(
            f"run {run} was trained with train.global_batch_size={meta['global_batch_size']}; "
            f"resuming with {global_batch_size} would change which rows each step trains"
        )
    if meta["dataset_manifest_sha256"] != manifest_sha256:
        raise ConfigError(f"run {run} was trained on another dataset (manifest sha256 "
                          f"{meta['dataset_manifest_sha256'][:12]}..., this one {manifest_sha256[:12]}...)")


def model_meta(config: GPTConfig) -> dict[str, Any]:
    return asdict(config)


@contextlib.contextmanager
def local_checkpoint_folder(checkpoint) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder, for reading.

    A local checkpoint is read in place. A remote one is downloaded into a
    folder of this process's own and removed afterwards. Written here rather
    than using `Checkpoint.as_directory`: that shares one temporary folder per
    checkpoint among all processes of a node, and a rank that arrives after
    another rank's download downloads into it again, overwriting model.pt
    while the other rank is still reading it (seen as a torn zip archive
    when two workers resumed from object storage at once)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    folder = Path(tempfile.mkdtemp(prefix="gptdist-checkpoint-"))
    try:
        checkpoint.to_directory(str(folder))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
