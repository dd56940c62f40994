"""Bad input: a clear error naming what is wrong, and nothing lost or
half-written. (Config typos, data-pipeline inputs and checkpoint files have
their own tests; tests/faults/README.md maps each case to its test.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import tiny_config
from data_pipeline.manifest import DatasetError
from gptdist.checkpoint import CheckpointError
from gptdist.checkpoint_source import checkpoint_folders
from gptdist.config import ConfigError
from gptdist.ray_session import connect_ray
from gptdist.driver import train_main
from gptdist.preflight import StorageError


def test_unreachable_ray_address_is_named():
    cfg = tiny_config(Path("/tmp"), Path("/tmp"), "x", "ray.address=127.0.0.1:9")
    with pytest.raises(ConnectionError, match=r"ray\.address='127\.0\.0\.1:9'"):
        connect_ray(cfg)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, reference_run, tiny_dataset):
    """A copy of the session's finished 2-worker run "reference"
    (conftest.py): its checkpoints, in a folder of the module's own."""
    ref_tmp, summary = reference_run
    tmp = tmp_path_factory.mktemp("finished")
    shutil.copytree(ref_tmp / "ray" / "reference", tmp / "ray" / "reference")
    return tmp, summary


def test_resume_with_another_model_shape_fails_before_workers(finished_run, tiny_dataset):
    tmp, _ = finished_run
    cfg = tiny_config(tmp, tiny_dataset, "reference", "model.preset=micro", "train.max_steps=8")
    with pytest.raises(CheckpointError, match=r"another model shape \(n_layer: checkpoint 2 vs model 4"):
        train_main(cfg)


def test_resume_with_another_global_batch_is_refused(finished_run, tiny_dataset):
    tmp, _ = finished_run
    cfg = tiny_config(tmp, tiny_dataset, "reference", "train.global_batch_size=4", "train.max_steps=8")
    with pytest.raises(ConfigError, match=r"trained with train\.global_batch_size=8; resuming with 4"):
        train_main(cfg)


def test_tampered_checkpoint_is_refused(finished_run, tiny_dataset, tmp_path):
    tmp, summary = finished_run
    copy = tmp_path / "ray" / "reference"
    shutil.copytree(tmp / "ray" / "reference", copy)
    latest = checkpoint_folders(copy)[-1]
    with open(latest / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    cfg = tiny_config(tmp_path, tiny_dataset, "reference", "train.max_steps=8")
    with pytest.raises(CheckpointError, match=r"model\.pt has sha256 .* the file was altered"):
        train_main(cfg)


def test_dataset_from_another_tokenizer_is_refused(tiny_dataset, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_hashes"] = {k: "0" * 64 for k in manifest["tokenizer"]["vocab_hashes"]}
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config(tmp_path, other, "other")
    with pytest.raises(DatasetError, match="tokeni"):
        train_main(cfg)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB filesystem standing in for a full disk."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to simulate a full disk: {done.stderr.decode()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_on_the_runs_folder_fails_before_training(tiny_dataset, tmp_path, tiny_tmpfs):
    cfg = tiny_config(tmp_path, tiny_dataset, "full-disk", f"ray.storage_path={tiny_tmpfs}")
    with pytest.raises(StorageError, match=r"ray\.storage_path=.*full has .* MiB free; checkpoints of this model need"):
        train_main(cfg)
    assert os.listdir(tiny_tmpfs) == []  # nothing half-written


def test_read_only_runs_folder_is_named(tiny_dataset, tmp_path, tiny_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    cfg = tiny_config(tmp_path, tiny_dataset, "read-only", f"ray.storage_path={tiny_tmpfs}/ray")
    with pytest.raises(StorageError, match=r"ray\.storage_path=.*full/ray is not writable"):
        train_main(cfg)
