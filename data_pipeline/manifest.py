"""The dataset manifest, and validation of a prepared dataset against it.

A prepared dataset is a folder, local or in object storage (see `storage`):

    DIR/manifest.json
    DIR/train/shard-00000.parquet ...
    DIR/val/shard-00000.parquet ...

`manifest.json` is written last (see `prepare` for how that is atomic on
each kind of storage), so a folder with a manifest is a complete dataset
unless something changed it afterwards, which `verify_split` detects: a
missing or extra shard, a row count or sha256 that differs from the
manifest, a block size other than the model's, or a tokenizer other than
ours. Every such problem is a `DatasetError` naming the shard (its full
path or URI) or the two values; storage that cannot be reached or read is a
`DatasetUnavailableError` naming the URI.

Example manifest (abridged):

    {
      "format": "gptdist-tokens", "format_version": 1,
      "gptdist_version": "0.1.0", "created_at": "2025-01-01T00:00:00Z",
      "tokenizer": {"name": "gpt2", "vocab_hashes": {...}, "eot_token": 50256,
                    "vocab_size": 50257},
      "block_size": 512, "row_length": 513, "dtype": "uint16",
      "columns": {"tokens": "fixed_size_list<uint16>[513]", "row": "int64"},
      "sources": ["shakespeare"], "text_column": "text", "val_fraction": 0.05,
      "split_method": "document-hash", "files": 38, "documents": 38,
      "tokens": 1796991, "dropped_tokens": 610,
      "splits": {
        "train": {"documents": 36, "tokens": 1700000, "rows": 3320,
                  "dropped_tokens": 319,
                  "shards": [{"file": "shard-00000.parquet", "rows": 3320,
                              "first_row": 0, "sha256": "..."}]},
        "val": {...}
      }
    }
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from gptdist.tokenizer import TOKENIZER_NAME, vocab_hashes

MANIFEST_NAME = "manifest.json"
# In object storage, present while `prepare` rebuilds the folder in place:
# marks it as ours (to be rebuilt) while it holds no manifest.
PREPARING_NAME = "preparing.json"
FORMAT = "gptdist-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Fields that differ between two runs producing identical shards.
VOLATILE_FIELDS = ("created_at",)


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete, altered, or does not fit
    the model; or an output folder is not one of our datasets."""


class DatasetUnavailableError(DatasetError):
    """The storage holding a dataset cannot be reached or refuses access."""


@contextlib.contextmanager
def storage_errors(doing: str = "") -> Iterator[None]:
    """Storage failures as DatasetUnavailableError, also when a Ray task
    met them. The message names the URI, after `doing` if given."""
    try:
        yield
    except Exception as e:
        cause = getattr(e, "cause", None) or e  # a Ray task's error carries the original
        if isinstance(cause, storage.StorageError):
            raise DatasetUnavailableError(f"{doing}: {cause}" if doing else str(cause)) from None
        raise


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(data_dir, MANIFEST_NAME), (json.dumps(manifest, indent=2) + "\n").encode())


def is_dataset_folder(location: str | Path) -> bool:
    """Whether `location` holds a manifest of ours (complete or not, any
    version) or the marker of a preparation of ours: a folder we may
    replace with --overwrite."""
    for name in (MANIFEST_NAME, PREPARING_NAME):
        try:
            if json.loads(storage.read_bytes(storage.join(location, name))).get("format") == FORMAT:
                return True
        except storage.StorageError:
            raise
        except (OSError, ValueError, AttributeError):
            pass
    return False


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset; DatasetError if the folder has
    none or it is not ours."""
    data_dir = storage.normalize(data_dir)
    path = storage.join(data_dir, MANIFEST_NAME)
    with storage_errors():
        if not storage.is_file(path):
            bucket = storage.root(data_dir)
            if storage.is_uri(data_dir) and not storage.exists(bucket):
                raise DatasetError(f"{data_dir} is not a prepared dataset: {bucket} does not exist")
            raise DatasetError(
                f"{data_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `gptdist prepare`"
            )
        data = storage.read_bytes(path)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a gptdist dataset manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {manifest.get('format_version')}, "
            f"this gptdist reads version {FORMAT_VERSION}; prepare the dataset again"
        )
    return manifest


def manifest_hash(data_dir: str | Path) -> str:
    """sha256 of the manifest without its volatile fields: equal for two
    preparations that produced identical shards from the same request."""
    stable = {k: v for k, v in read_manifest(data_dir).items() if k not in VOLATILE_FIELDS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def check_tokenizer(manifest: dict[str, Any], where: Any) -> None:
    tok = manifest.get("tokenizer", {})
    if tok.get("name") != TOKENIZER_NAME or tok.get("vocab_hashes") != vocab_hashes():
        raise DatasetError(
            f"{where} was tokenized with {tok.get('name')!r} (vocabulary hashes "
            f"{tok.get('vocab_hashes')}), not this gptdist's {TOKENIZER_NAME!r} "
            f"({vocab_hashes()}); prepare it again"
        )


def check_block_size(manifest: dict[str, Any], block_size: int | None, where: Any) -> None:
    if block_size is not None and manifest["block_size"] != block_size:
        raise DatasetError(
            f"{where} holds rows for block_size={manifest['block_size']}, but the model "
            f"has block_size={block_size}; prepare it with --block-size {block_size}"
        )


def verify_split(
    data_dir: str | Path, split: str, block_size: int | None = None, checksums: bool = True
) -> list[str]:
    """The shard locations of `split` in row order (absolute paths, or URIs
    in object storage), after checking them against the manifest:
    tokenizer, block size, the exact set of shard files, each shard's row
    count (from the Parquet footer) and, with `checksums`, its sha256. Any
    mismatch is a DatasetError naming the shard."""
    data_dir = storage.normalize(data_dir)
    manifest = read_manifest(data_dir)
    check_tokenizer(manifest, data_dir)
    check_block_size(manifest, block_size, data_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{data_dir} has no split {split!r} (splits: {list(manifest['splits'])})")
    entry = manifest["splits"][split]
    split_dir = storage.join(data_dir, split)
    locations = []
    next_row = 0
    with storage_errors():
        _check_shard_set(split_dir, [s["file"] for s in entry["shards"]])
        for shard in entry["shards"]:
            location = storage.join(split_dir, shard["file"])
            if shard["first_row"] != next_row:
                raise DatasetError(
                    f"{location}: manifest says first row {shard['first_row']}, expected {next_row}"
                )
            _check_shard(location, shard, manifest["row_length"], checksums)
            next_row += shard["rows"]
            locations.append(location)
    if next_row != entry["rows"]:
        raise DatasetError(f"{split_dir}: shards hold {next_row} rows, the manifest says {entry['rows']}")
    return locations


def _check_shard_set(split_dir: str, expected: list[str]) -> None:
    present = set(storage.list_names(split_dir))
    if not present and not storage.exists(split_dir):
        raise DatasetError(f"{split_dir} is missing")
    for name in expected:
        if name not in present:
            raise DatasetError(f"shard {storage.join(split_dir, name)} is missing")
    for name in sorted(present - set(expected)):
        raise DatasetError(f"{storage.join(split_dir, name)} is not in the manifest (an extra file)")


def _check_shard(location: str, shard: dict[str, Any], row_length: int, checksums: bool) -> None:
    try:
        with storage.open_input_file(location) as f:
            meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except storage.StorageError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"shard {location} is unreadable (truncated or altered?): {e}") from None
    if meta.num_rows != shard["rows"]:
        raise DatasetError(f"shard {location} has {meta.num_rows} rows, the manifest says {shard['rows']}")
    tokens = schema.field("tokens").type if "tokens" in schema.names else None
    if not (pa.types.is_fixed_size_list(tokens) and tokens.list_size == row_length):
        raise DatasetError(f"shard {location}: column 'tokens' is {tokens}, expected {row_length} tokens per row")
    if checksums and storage.sha256(location) != shard["sha256"]:
        raise DatasetError(f"shard {location} has a sha256 that differs from the manifest (altered?)")
