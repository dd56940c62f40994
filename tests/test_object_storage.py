"""Datasets and Ray checkpoints in object storage: a real S3 API
(`moto_server`) reached through the standard AWS_ENDPOINT_URL, a real
local Ray whose workers write the shards, and every failure (a missing or
altered object, a dead endpoint, a missing bucket) a clear error naming
the URI, within seconds."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import ray
import ray.train
import torch
from mlflow.tracking import MlflowClient

from data_pipeline import storage
from data_pipeline.manifest import (
    MANIFEST_NAME,
    PREPARING_NAME,
    DatasetError,
    DatasetUnavailableError,
    manifest_hash,
    read_manifest,
    verify_split,
)
from gptdist.run_data import dataset_request
from data_pipeline.prepare import ensure_dataset, prepare_dataset
from data_pipeline.reader import open_split
from gptdist.fault_injection import FaultHooks
from gptdist.checkpoint import (CheckpointError, clean_state_dict, load_model_state, local_checkpoint_folder, model_meta,
                                save_checkpoint)
from gptdist.checkpoint_source import checkpoint_folders, resolve_source
from gptdist.cli import main as cli_main
from gptdist.config import ConfigError, load_config
from gptdist.model import GPT
from gptdist.preflight import StorageError, check_resume_compatible, check_storage
from gptdist.run_data import open_dataset
from data_pipeline.stream import TrainStream
from gptdist.driver import train_main
from support import BLOCK, audited_rows, free_port, tiny_config, wait_for, write_tiny_corpus

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def s3_ray(s3_server, own_ray):
    """A local Ray of the module's own, started after `s3_server` set the
    AWS_* variables, so its workers inherit them."""
    from gptdist.ray_session import start_local_ray

    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def s3_dataset(s3_server, s3_ray, tiny_corpus) -> str:
    """The tiny corpus prepared by Ray workers straight into
    `s3://gptdist-test/tiny` (block size 64); its URI."""
    uri = f"{s3_server}/tiny"
    prepare_dataset([str(tiny_corpus)], uri, block_size=BLOCK, val_fraction=0.1)
    return uri


def copy_of(uri: str, name: str) -> str:
    """A copy of a dataset (or any folder) beside it, to damage."""
    copy = storage.join(storage.root(uri), name)
    storage.delete(copy)
    storage.copy_folder(uri, copy)
    return copy


# --- datasets -------------------------------------------------------------------


def test_prepared_dataset_verifies_and_lists_uris(s3_dataset, prepared_tiny_dataset):
    manifest = read_manifest(s3_dataset)
    assert manifest["block_size"] == BLOCK
    assert storage.list_names(s3_dataset) == [MANIFEST_NAME, "train", "val"]  # no preparing.json left
    for split in ("train", "val"):
        shards = verify_split(s3_dataset, split, block_size=BLOCK)
        assert shards and all(s.startswith(f"{s3_dataset}/{split}/shard-") for s in shards)
        # Byte-identical to the same corpus prepared into a local folder.
        local = read_manifest(prepared_tiny_dataset)["splits"][split]
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == [
            s["sha256"] for s in local["shards"]]
    ds = open_split(s3_dataset, "val", block_size=BLOCK)  # Ray Data reads the shards from S3
    assert ds.count() == manifest["splits"]["val"]["rows"]


def test_preparing_again_is_a_no_op(s3_dataset, tiny_corpus, capsys):
    before = storage.read_bytes(storage.join(s3_dataset, MANIFEST_NAME))
    prepare_dataset([str(tiny_corpus)], s3_dataset + "/", block_size=BLOCK, val_fraction=0.1)
    assert "nothing to do" in capsys.readouterr().out
    assert storage.read_bytes(storage.join(s3_dataset, MANIFEST_NAME)) == before  # not rewritten


def test_ensure_dataset_returns_the_uri(s3_server, s3_dataset, capsys):
    cfg = load_config(overrides=[f"data.path={s3_dataset}/", f"model.block_size={BLOCK}"])
    assert ensure_dataset(cfg.data.path, dataset_request(cfg)) == s3_dataset
    cfg = load_config(overrides=[f"data.path={s3_dataset}-absent", "data.sources=[corpus.jsonl]"])
    with pytest.raises(DatasetError, match=f"dataset {s3_dataset}-absent does not exist"):
        ensure_dataset(cfg.data.path, dataset_request(cfg))
    # The embedded default is prepared into the bucket when absent.
    cfg = load_config(overrides=[f"data.path={s3_server}/shakespeare"])
    assert ensure_dataset(cfg.data.path, dataset_request(cfg)) == f"{s3_server}/shakespeare"
    assert "preparing it from the embedded Shakespeare corpus" in capsys.readouterr().out
    assert read_manifest(cfg.data.path)["block_size"] == cfg.model.block_size


def test_interrupted_and_repeated_preparation(s3_server, s3_ray, tiny_corpus, monkeypatch, capsys):
    """Object storage has no rename: an interrupted run leaves no manifest
    (never a dataset) and is rebuilt by the next run; rebuilding over an
    older dataset with more shards leaves none of its objects behind."""
    import data_pipeline.prepare as prepare

    uri = f"{s3_server}/rebuilt"
    prepare_dataset([str(tiny_corpus)], uri, block_size=BLOCK, val_fraction=0.1, rows_per_shard=10)
    assert len(read_manifest(uri)["splits"]["train"]["shards"]) > 2

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(tiny_corpus)], uri, block_size=BLOCK, val_fraction=0.1, overwrite=True)
    monkeypatch.undo()
    assert storage.list_names(uri) == [PREPARING_NAME, "train", "val"]  # shards written, no manifest
    with pytest.raises(DatasetError, match=f"{uri} is not a prepared dataset"):
        verify_split(uri, "train")

    capsys.readouterr()
    prepare_dataset([str(tiny_corpus)], uri, block_size=BLOCK, val_fraction=0.1)  # no overwrite needed
    assert "unfinished preparation" in capsys.readouterr().out
    assert storage.list_names(uri) == [MANIFEST_NAME, "train", "val"]
    assert storage.list_names(f"{uri}/train") == ["shard-00000.parquet"]  # the old shards are gone
    verify_split(uri, "train")


def test_missing_shard_object_is_named(s3_dataset):
    copy = copy_of(s3_dataset, "missing-shard")
    storage.delete(f"{copy}/val/shard-00000.parquet")
    with pytest.raises(DatasetError, match=f"shard {copy}/val/shard-00000.parquet is missing"):
        verify_split(copy, "val")


def test_altered_shard_object_is_named(s3_dataset):
    copy = copy_of(s3_dataset, "altered-shard")
    shard = f"{copy}/train/shard-00000.parquet"
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # same size, same footer: only the sha256 sees it
    storage.write_bytes(shard, bytes(data))
    verify_split(copy, "train", checksums=False)
    with pytest.raises(DatasetError, match=f"shard {copy}/train/shard-00000.parquet has a sha256 that differs"):
        verify_split(copy, "train")


def test_missing_bucket_is_named():
    with pytest.raises(DatasetError, match="s3://no-such-bucket does not exist"):
        read_manifest("s3://no-such-bucket/tiny")


def test_unreachable_endpoint_is_named(s3_dataset, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    for call in (lambda: verify_split(s3_dataset, "train"),
                 lambda: prepare_dataset(["shakespeare"], f"{s3_dataset}-new")):
        with pytest.raises(DatasetUnavailableError) as e:
            call()
        assert "s3://gptdist-test/tiny" in str(e.value) and dead in str(e.value)
    cfg = tiny_config(tmp_path, s3_dataset, "dead", f"ray.storage_path={s3_dataset}-runs")
    with pytest.raises(StorageError, match=f"ray.storage_path={s3_dataset}-runs is not writable"):
        check_storage(cfg, num_params=1000)


# --- Ray checkpoints ---------------------------------------------------------------


def test_checkpoints_under_an_s3_storage_path(s3_server, s3_dataset, tmp_path, capsys):
    """The pre-checks of `gptdist train` and `--from` of sample/eval/export
    on a run whose Ray checkpoints live in the bucket."""
    runs = f"{s3_server}/runs"
    cfg = tiny_config(tmp_path, s3_dataset, "in-s3", f"ray.storage_path={runs}")
    check_storage(cfg, num_params=1000)  # a write probe, removed again
    assert storage.list_names(runs) == []
    dataset = open_dataset(cfg)
    check_resume_compatible(cfg, dataset)  # no checkpoints yet

    torch.manual_seed(0)
    model = GPT(cfg.model.to_gpt_config())
    meta = {"model": model_meta(model.config), "step": 2, "global_batch_size": cfg.train.global_batch_size,
            "dataset_manifest_sha256": manifest_hash(s3_dataset)}
    run = f"{runs}/in-s3"
    storage.copy_folder(save_checkpoint(tmp_path / "ckpt", clean_state_dict(model), None, meta),
                        f"{run}/checkpoint_00000002")
    storage.write_bytes(f"{run}/checkpoint_00000003/model.pt", b"cut short")  # no meta.json
    storage.write_bytes(f"{run}/checkpoint_manager_snapshot.json", b"{}")
    assert checkpoint_folders(run) == [f"{run}/checkpoint_00000002", f"{run}/checkpoint_00000003"]

    check_resume_compatible(cfg, dataset)
    other = tiny_config(tmp_path, s3_dataset, "in-s3", f"ray.storage_path={runs}", "train.global_batch_size=4")
    with pytest.raises(ConfigError, match="trained with train.global_batch_size=8"):
        check_resume_compatible(other, dataset)

    for source in ("in-s3", run, f"{run}/checkpoint_00000002"):  # run name, run folder, checkpoint folder
        resolved = resolve_source(source, cfg)
        assert resolved.path == tmp_path / "downloads" / "s3" / "gptdist-test" / "runs" / "in-s3" / "checkpoint_00000002"
        assert json.loads((resolved.path / "meta.json").read_text())["step"] == 2
    assert not list(resolved.path.parent.glob(".download-*"))  # the temporary folder was renamed into place
    with pytest.raises(CheckpointError, match=f"no checkpoint folder at {runs}/absent"):
        resolve_source(f"{runs}/absent", cfg)

    argv = ["sample", "--from", run, "--max-new-tokens", "3", "--prompt", "To be",
            "--set", f"tracking.runs_dir={tmp_path}"]
    assert cli_main(argv) == 0
    assert f"sampling from Ray run {run} (step 2)" in capsys.readouterr().err



def test_ranks_reading_one_bucket_checkpoint_get_folders_of_their_own(s3_server, tmp_path):
    """Two readers of one checkpoint in the bucket, the second arriving while
    the first still reads: Ray's shared download folder would be downloaded
    into again under the first reader; each reader gets its own copy, and
    the first one's files stay intact until it is done."""
    model = GPT(tiny_config(tmp_path, "unused", "x").model.to_gpt_config())
    uri = f"{s3_server}/shared-read/checkpoint_00000001"
    storage.copy_folder(save_checkpoint(tmp_path / "ckpt", clean_state_dict(model), None,
                                        {"model": model_meta(model.config), "step": 1}), uri)
    checkpoint = ray.train.Checkpoint(uri)
    with local_checkpoint_folder(checkpoint) as first:
        before = (first / "model.pt").stat().st_mtime_ns
        with local_checkpoint_folder(checkpoint) as second:
            assert first != second
            assert (second / "model.pt").read_bytes() == (first / "model.pt").read_bytes()
        assert (first / "model.pt").stat().st_mtime_ns == before  # not written again under the first reader
        load_model_state(first)
    assert not first.exists() and not second.exists()

# --- training on data in the bucket ---------------------------------------------


def test_a_damaged_bucket_dataset_fails_before_any_worker(s3_server, s3_dataset, tmp_path):
    copy = copy_of(s3_dataset, "damaged-for-training")
    storage.delete(f"{copy}/train/shard-00000.parquet")
    runs = f"{s3_server}/runs-damaged"
    cfg = tiny_config(tmp_path, copy, "damaged", f"ray.storage_path={runs}")
    with pytest.raises(DatasetError, match=f"shard {copy}/train/shard-00000.parquet is missing"):
        train_main(cfg)
    assert storage.list_names(runs) == []  # no run folder: no worker ever started


def test_train_from_the_bucket_and_kill_a_worker(s3_server, s3_dataset, tmp_path):
    """2 gloo workers read the dataset from S3 through Ray Data and
    checkpoint into the bucket; rank 1 is SIGKILLed after step 3 and Ray
    Train restarts the workers from the step-2 checkpoint in the bucket, to
    the end of the epoch. Every row of the epoch is trained exactly once, at
    the step the plan gives it, and one MLflow run holds each step once.
    (Resuming on another worker count: tests/test_training.py.)"""
    runs = f"{s3_server}/runs-train"
    audit, pids = tmp_path / "audit", tmp_path / "pids"
    # 32 rows a step: the tiny split's 184 rows are 5 steps, 24 rows left over.
    cfg = tiny_config(tmp_path, s3_dataset, "from-s3", "ray.num_workers=2", "train.micro_batch_size=16",
                      "ray.max_failures=2", "train.max_steps=5", "train.global_batch_size=32",
                      "train.checkpoint_interval=2", f"ray.storage_path={runs}")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_main(
        cfg, hooks=FaultHooks(audit_dir=str(audit), pid_dir=str(pids)))))
    thread.start()
    wait_for(lambda: len(audited_rows(audit)) >= 3, what="three trained steps")
    killed = int((pids / "rank1.pid").read_text())
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=600)
    assert result["step"] == 5
    assert int((pids / "rank1.pid").read_text()) != killed  # a new worker process took over
    assert result["checkpoint"] == f"{runs}/from-s3/checkpoint_00000005"
    assert json.loads(storage.read_bytes(f"{result['checkpoint']}/meta.json"))["step"] == 5

    info = open_dataset(cfg)
    plan = TrainStream(info.shards("train"), seed=cfg.data.seed, global_batch=32, micro_batch=32,
                       rank=0, world_size=1)  # the rows of each whole step, both ranks' together
    assert plan.steps_per_epoch == 5
    expected = {step: sorted(plan.step_rows(step).tolist()) for step in range(5)}
    rows = audited_rows(audit)
    assert rows == expected
    every = [r for step_rows in rows.values() for r in step_rows]
    assert len(every) == len(set(every)) == 5 * 32  # each row of the epoch once
    # One MLflow run; step 3, trained twice, is logged once.
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gptdist").experiment_id])
    assert run.info.status == "FINISHED" and "rank 1" in run.data.tags["gptdist.last_worker_error"]
    for key in ("train/loss", "lr", "tokens_seen"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4, 5], key
