"""The per-worker training stream, resumable at an exact row.

Guarantees
----------
* Epoch order. Epoch `e` visits the rows of the train split in an order fixed
  by `(seed, e)`: the shards in a seeded permutation, and inside each shard
  the rows in a seeded permutation. The same dataset and seed give the same
  order on every machine and for every number of workers.
* Position is a function of the optimizer step. With a global batch of G
  rows, step `s` trains on rows `order_e[j*G:(j+1)*G]` where
  `e, j = divmod(s, steps_per_epoch)`. The `N mod G` rows left over at the
  end of an epoch's order are not trained in that epoch (the next epoch's
  permutation differs, so no row is left out for good).
* Rank slicing. Inside a step, micro-step `m` of rank `r` (of W workers,
  micro-batch b) takes rows `[(m*W + r)*b, (m*W + r + 1)*b)` of the step's G
  rows. Any W and accumulation with the same G cover the same G rows, so a
  run resumed on another worker count continues with exactly the rows the
  original run would have trained: within an epoch no row is trained twice
  and none is skipped.

Two ways to read
----------------
`data_pipeline.ingest` (the default, `data.ingest: ray_data`) feeds each
worker through Ray Data, reading the shards from any filesystem pyarrow
reads; it computes the rows with the functions below, so both ways train
the same rows. `TrainStream` (`data.ingest: direct`) is the reference and a
fallback: each worker reads the shard it is in with pyarrow and keeps it in
memory, on the worker's own thread, with no read-ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from data_pipeline import storage


@dataclass(frozen=True)
class Shard:
    path: str  # a local path or a URI (s3://, gs://, ...)
    first_row: int
    rows: int


def epoch_order(shards: list[Shard], seed: int, epoch: int) -> np.ndarray:
    """Global row indices of the split in the order epoch `epoch` visits them."""
    rng = np.random.default_rng([seed, epoch])
    parts = [s.first_row + rng.permutation(s.rows) for s in (shards[i] for i in rng.permutation(len(shards)))]
    return np.concatenate(parts).astype(np.int64)


def read_shard_tokens(location: str, vocab_size: int | None = None) -> np.ndarray:
    """A shard's token rows as one (rows, T+1) array, from any filesystem."""
    fs, path = storage.filesystem(location)
    column = pq.read_table(path, columns=["tokens"], filesystem=fs).column("tokens").combine_chunks()
    tokens = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        # An embedding lookup would fail deep inside the model; say where instead.
        raise ValueError(
            f"{location} holds token id {int(tokens.max())}, outside the model's "
            f"vocabulary of {vocab_size} (model.vocab_size)"
        )
    return tokens



def steps_per_epoch(shards: list[Shard], global_batch: int) -> int:
    total_rows = sum(s.rows for s in shards)
    if total_rows < global_batch:
        raise ValueError(
            f"the train split has {total_rows} rows, fewer than one global batch "
            f"(train.global_batch_size={global_batch})"
        )
    return total_rows // global_batch


def data_position(step: int, steps_in_epoch: int, global_batch: int) -> dict[str, int]:
    """Where step `step` starts: epoch and rows already consumed in it."""
    epoch, j = divmod(step, steps_in_epoch)
    return {"epoch": epoch, "epoch_row": j * global_batch}


def rows_for_micro_step(step_rows: np.ndarray, micro_step: int, rank: int, world_size: int, micro_batch: int) -> np.ndarray:
    start = (micro_step * world_size + rank) * micro_batch
    return step_rows[start : start + micro_batch]


class ShardCache:
    """Row lookup by global index; keeps the few most recent shards in memory
    (an epoch visits one shard after another, so two suffice)."""

    def __init__(self, shards: list[Shard], keep: int = 3, vocab_size: int | None = None):
        self.shards = shards
        self.vocab_size = vocab_size
        self.starts = np.array([s.first_row for s in shards], dtype=np.int64)
        self.keep = keep
        self._loaded: dict[int, np.ndarray] = {}

    def _shard_tokens(self, i: int) -> np.ndarray:
        if i not in self._loaded:
            tokens = read_shard_tokens(str(self.shards[i].path), self.vocab_size)
            if len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[i] = tokens
        return self._loaded[i]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = [self._shard_tokens(int(i))[int(r) - self.shards[int(i)].first_row] for i, r in zip(shard_of, indices)]
        return np.stack(out)


def micro_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step: micro_batch x world_size x micro-steps
    is the global batch, or the slicing above would drop rows."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"a global batch of {global_batch} rows is not divisible by "
                         f"{micro_batch} rows x {world_size} workers")
    return global_batch // per_step


class TrainStream:
    """Batches for one rank, starting at any optimizer step."""

    def __init__(self, shards: list[Shard], *, seed: int, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, vocab_size: int | None = None):
        self.cache = ShardCache(shards, vocab_size=vocab_size)
        self.shards = shards
        self.seed = seed
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.accumulation = micro_steps(global_batch, micro_batch, world_size)
        self.steps_per_epoch = steps_per_epoch(shards, global_batch)
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def position(self, step: int) -> dict[str, int]:
        return data_position(step, self.steps_per_epoch, self.global_batch)

    def step_rows(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order = epoch_order(self.shards, self.seed, epoch)
            self._order_epoch = epoch
        return self._order[j * self.global_batch : (j + 1) * self.global_batch]

    def micro_batches(self, step: int):
        """Yield (row_indices, tokens int64 tensor of shape (b, T+1)) for each
        micro-step of this rank at optimizer step `step`."""
        import torch  # not at the top: Ray Data's reader actors import this module (rank_rows)

        rows = self.step_rows(step)
        for m in range(self.accumulation):
            mine = rows_for_micro_step(rows, m, self.rank, self.world_size, self.micro_batch)
            yield mine, torch.from_numpy(self.cache.rows(mine).astype(np.int64))


def eval_batches(shards: list[Shard], *, num_batches: int, micro_batch: int, rank: int, world_size: int,
                 vocab_size: int | None = None):
    """The same fixed validation rows for every evaluation (rows 0.. of the
    split, wrapping round a small split), dealt round-robin to ranks, so
    losses are comparable across evals and across runs."""
    import torch  # not at the top: Ray Data's reader actors import this module (rank_rows)

    cache = ShardCache(shards, vocab_size=vocab_size)
    total = sum(s.rows for s in shards)
    for k in range(num_batches):
        start = (k * world_size + rank) * micro_batch
        idx = np.arange(start, start + micro_batch) % total
        yield torch.from_numpy(cache.rows(idx).astype(np.int64))
