"""The dataset of a training run: opened and verified (prepared first when
it is the embedded default), described for MLflow (its own sources,
manifest hash, a sample prompt from its text), and handed to Ray Data as
each worker's rows."""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from data_pipeline import storage
from data_pipeline.ingest import DATASET_NAME, RowOrderDataConfig, RowPlan, shard_listing
from data_pipeline.manifest import manifest_hash, read_manifest
from data_pipeline.prepare import DatasetRequest, ensure_dataset
from data_pipeline.reader import first_row_tokens
from data_pipeline.stream import Shard
from gptdist.checkpoint_source import resume_step
from gptdist.config import Config
from gptdist.ray_session import storage_path
from gptdist.redaction import redact_uri
from gptdist.tokenizer import EOT_TOKEN, decode, encode
from gptdist.worker_contract import DatasetSpec


@dataclass
class DatasetInfo:
    path: str  # an absolute local path or a URI
    manifest: dict
    manifest_sha256: str

    def shards(self, split: str) -> list[Shard]:
        # ensure_dataset has already verified every shard against the manifest.
        return [Shard(storage.join(self.path, split, s["file"]), s["first_row"], s["rows"])
                for s in self.manifest["splits"][split]["shards"]]

    def to_spec(self) -> DatasetSpec:
        return DatasetSpec(self.path, self.manifest_sha256, self.shards("train"), self.shards("val"))


def dataset_request(cfg: Config) -> DatasetRequest:
    return DatasetRequest(list(cfg.data.sources), cfg.model.block_size, cfg.data.val_fraction, cfg.data.text_column,
                          cfg.ray.local_num_cpus)


def open_dataset(cfg: Config) -> DatasetInfo:
    """The prepared dataset, validated against its manifest and the model's
    block size (prepared first when it is the embedded default and absent)."""
    path = storage.normalize(ensure_dataset(cfg.data.path, dataset_request(cfg)))
    return DatasetInfo(path, read_manifest(path), manifest_hash(path))


def dataset_prompt(dataset: DatasetInfo, max_tokens: int = 8) -> str:
    """A sample prompt that belongs to the dataset: in the first validation
    row, the first line that names a speaker ("ROMEO:"), else its first
    non-empty line, cut to `max_tokens` tokens."""
    text = decode([t for t in first_row_tokens(dataset.path, "val") if t != EOT_TOKEN])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "\n"
    speaker = next((line for line in lines if re.fullmatch(r"[A-Z][A-Za-z .'-]{0,30}:", line)), None)
    return speaker or decode(encode(lines[0])[:max_tokens])


def data_params(dataset: DatasetInfo) -> dict[str, str]:
    """The run's data as the dataset itself records it (not the config's
    `data.sources`, which only says what to prepare when it is absent)."""
    return {"data.sources": dataset.manifest.get("sources", []), "data.manifest_sha256": dataset.manifest_sha256}


DATASET_INPUT_ATTEMPTS = 3


def log_dataset_input(client, run_id: str, dataset: DatasetInfo) -> None:
    """The dataset in MLflow's own Datasets record of the run (the
    "Datasets used" column of the UI): name, manifest hash, location."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    splits = dataset.manifest.get("splits", {})
    profile = {split: {"rows": info.get("rows"), "tokens": info.get("tokens")} for split, info in splits.items()}
    entry = Dataset(name=dataset_name(dataset.path), digest=dataset.manifest_sha256[:16],
                    source_type="gptdist-tokens", source=json.dumps({"uri": redact_uri(dataset.path)}),
                    profile=json.dumps(profile))
    inputs = [DatasetInput(entry, tags=[InputTag("mlflow.data.context", "training")])]
    # MLflow looks the dataset up, then inserts it if absent: runs logging the
    # same new dataset at the same moment (a sweep's trials starting
    # together) race, and the losers' inserts fail on the store's unique key.
    # A retry finds the winner's row.
    for attempt in range(DATASET_INPUT_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException:
            if attempt == DATASET_INPUT_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def dataset_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def train_datasets(cfg: Config, dataset: DatasetInfo) -> dict[str, Any]:
    """The `datasets` and `dataset_config` of the TorchTrainer: the train
    split's shard listing, which RowOrderDataConfig turns into each rank's
    rows (data_pipeline.ingest); nothing when workers read shards directly."""
    if cfg.data.ingest != "ray_data":
        return {}
    plan = RowPlan(seed=cfg.data.seed, global_batch=cfg.train.global_batch_size,
                   micro_batch=cfg.train.micro_batch_size, max_steps=cfg.train.max_steps,
                   vocab_size=cfg.model.vocab_size)
    run_folder = storage.join(storage_path(cfg), cfg.train.run_name)
    return {"datasets": {DATASET_NAME: shard_listing(dataset.shards("train"))},
            "dataset_config": RowOrderDataConfig(plan, functools.partial(resume_step, run_folder),
                                                 read_cpus=cfg.data.read_cpus,
                                                 env=storage.endpoint_env())}
