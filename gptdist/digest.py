"""sha256 of files: how datasets, checkpoints and tokenizer files are
recognised as complete and unaltered."""

from __future__ import annotations

from pathlib import Path

from data_pipeline import storage


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (local or in object storage), read in 1 MiB
    chunks: shards and checkpoints can be large."""
    return storage.sha256(path)
