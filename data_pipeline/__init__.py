"""Text in, fixed-size token rows out.

- `sources`: what a corpus source is, and reading it into documents.
- `packing`: the row layout, the train/val split and shard planning (pure numpy).
- `prepare`: `gptdist prepare`, on Ray Data: tokenize, pack, write, commit.
- `manifest`: the dataset manifest and `verify_split`.
- `reader`: `open_split`, a verified split as a Ray Dataset.
- `stream`: the resumable per-worker training stream.
"""
