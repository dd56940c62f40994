"""The dataset manifest, and validation of a prepared dataset against it.

A prepared dataset is a folder:

    DIR/manifest.json
    DIR/train/shard-00000.parquet ...
    DIR/val/shard-00000.parquet ...

`manifest.json` is written last, into a staging folder that is renamed into
place, so a folder with a manifest is a complete dataset unless something
changed it afterwards, which `verify_split` detects: a missing or extra
shard, a row count or sha256 that differs from the manifest, a block size
other than the model's, or a tokenizer other than ours. Every such problem
is a `DatasetError` naming the shard or the two values.

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

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gptdist.digest import sha256_file
from gptdist.tokenizer import TOKENIZER_NAME, vocab_hashes

MANIFEST_NAME = "manifest.json"
FORMAT = "gptdist-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Fields that differ between two runs producing identical shards.
VOLATILE_FIELDS = ("created_at",)


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete, altered, or does not fit
    the model; or an output folder is not one of our datasets."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    (Path(data_dir) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def is_dataset_folder(path: str | Path) -> bool:
    """Whether `path` holds a manifest of ours (complete or not, any
    version): a folder we may replace with --overwrite."""
    try:
        return json.loads((Path(path) / MANIFEST_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset; DatasetError if the folder has
    none or it is not ours."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(
            f"{data_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `gptdist prepare`"
        )
    try:
        manifest = json.loads(path.read_text())
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
) -> list[Path]:
    """The shard paths of `split` in row order, after checking them against
    the manifest: tokenizer, block size, the exact set of shard files, each
    shard's row count (from the Parquet footer) and, with `checksums`, its
    sha256. Any mismatch is a DatasetError naming the shard."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    check_tokenizer(manifest, data_dir)
    check_block_size(manifest, block_size, data_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{data_dir} has no split {split!r} (splits: {list(manifest['splits'])})")
    entry = manifest["splits"][split]
    split_dir = data_dir / split
    _check_shard_set(split_dir, [s["file"] for s in entry["shards"]])
    paths = []
    next_row = 0
    for shard in entry["shards"]:
        path = split_dir / shard["file"]
        if shard["first_row"] != next_row:
            raise DatasetError(f"{path}: manifest says first row {shard['first_row']}, expected {next_row}")
        _check_shard(path, shard, manifest["row_length"], checksums)
        next_row += shard["rows"]
        paths.append(path)
    if next_row != entry["rows"]:
        raise DatasetError(f"{split_dir}: shards hold {next_row} rows, the manifest says {entry['rows']}")
    return paths


def _check_shard_set(split_dir: Path, expected: list[str]) -> None:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} is missing")
    present = {p.name for p in split_dir.iterdir()}
    for name in expected:
        if name not in present:
            raise DatasetError(f"shard {split_dir / name} is missing")
    for name in sorted(present - set(expected)):
        raise DatasetError(f"{split_dir / name} is not in the manifest (an extra file)")


def _check_shard(path: Path, shard: dict[str, Any], row_length: int, checksums: bool) -> None:
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"shard {path} is unreadable (truncated or altered?): {e}") from None
    if meta.num_rows != shard["rows"]:
        raise DatasetError(f"shard {path} has {meta.num_rows} rows, the manifest says {shard['rows']}")
    tokens = schema.field("tokens").type if "tokens" in schema.names else None
    if not (pa.types.is_fixed_size_list(tokens) and tokens.list_size == row_length):
        raise DatasetError(f"shard {path}: column 'tokens' is {tokens}, expected {row_length} tokens per row")
    if checksums and sha256_file(path) != shard["sha256"]:
        raise DatasetError(f"shard {path} has a sha256 that differs from the manifest (altered?)")
