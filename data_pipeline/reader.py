"""Reading a prepared split back as a Ray Dataset.

Each row has `tokens`, block_size + 1 token ids (uint16 for GPT-2: convert
with `.to(torch.long)` after `iter_torch_batches`), and `row`, its global
index within the split. Inputs are tokens[:-1], targets tokens[1:].

The shards are read in manifest order. Ray Data yields them in that order
when the dataset's `DataContext.execution_options.preserve_order` is set;
whatever the order, `row` identifies each example.
"""

from __future__ import annotations

from pathlib import Path

import ray

from data_pipeline import storage
from data_pipeline.manifest import verify_split


def open_split(data_dir: str | Path, split: str, block_size: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset over the verified shards of `split` (see
    `manifest.verify_split`; a DatasetError names what is wrong)."""
    locations = verify_split(data_dir, split, block_size=block_size)
    filesystem, _ = storage.filesystem(data_dir)
    return ray.data.read_parquet(locations, filesystem=filesystem, file_extensions=["parquet"])


def first_row_tokens(data_dir: str | Path, split: str) -> list[int]:
    """The token ids of row 0 of `split` (its first shard's first row)."""
    import pyarrow.parquet as pq

    from data_pipeline.manifest import read_manifest

    first = read_manifest(data_dir)["splits"][split]["shards"][0]["file"]
    filesystem, root = storage.filesystem(data_dir)
    with filesystem.open_input_file(f"{root}/{split}/{first}") as f:
        table = pq.ParquetFile(f).read_row_group(0, columns=["tokens"])
    return [int(t) for t in table.column("tokens")[0].as_py()]
