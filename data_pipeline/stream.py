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

Why not a Ray Data iterator: open-source Ray Data iterators cannot be
checkpointed or seeked (ray-project/ray#37633, #48224), and a streaming split
assigns blocks to workers by timing, so neither the rows a worker saw nor
where to restart can be known. Shards are Parquet files of a few MB, so each
worker reads the shard it is in with pyarrow and keeps it in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


@dataclass(frozen=True)
class Shard:
    path: Path
    first_row: int
    rows: int


def epoch_order(shards: list[Shard], seed: int, epoch: int) -> np.ndarray:
    """Global row indices of the split in the order epoch `epoch` visits them."""
    rng = np.random.default_rng([seed, epoch])
    parts = [s.first_row + rng.permutation(s.rows) for s in (shards[i] for i in rng.permutation(len(shards)))]
    return np.concatenate(parts).astype(np.int64)


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
            table = pq.read_table(self.shards[i].path, columns=["tokens"])
            column = table.column("tokens").combine_chunks()
            width = column.type.list_size
            tokens = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
            if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
                # An embedding lookup would fail deep inside the model; say where instead.
                raise ValueError(
                    f"{self.shards[i].path} holds token id {int(tokens.max())}, outside the model's "
                    f"vocabulary of {self.vocab_size} (model.vocab_size)"
                )
            if len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[i] = tokens
        return self._loaded[i]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = [self._shard_tokens(int(i))[int(r) - self.shards[int(i)].first_row] for i, r in zip(shard_of, indices)]
        return np.stack(out)


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
        self.accumulation = global_batch // (micro_batch * world_size)
        total_rows = sum(s.rows for s in shards)
        self.steps_per_epoch = total_rows // global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the train split has {total_rows} rows, fewer than one global batch "
                f"(train.global_batch_size={global_batch})"
            )
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def position(self, step: int) -> dict[str, int]:
        """Where step `step` starts: epoch and rows already consumed in it."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "epoch_row": j * self.global_batch}

    def step_rows(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order = epoch_order(self.shards, self.seed, epoch)
            self._order_epoch = epoch
        return self._order[j * self.global_batch : (j + 1) * self.global_batch]

    def micro_batches(self, step: int):
        """Yield (row_indices, tokens int64 tensor of shape (b, T+1)) for each
        micro-step of this rank at optimizer step `step`."""
        rows = self.step_rows(step)
        for m in range(self.accumulation):
            mine = rows_for_micro_step(rows, m, self.rank, self.world_size, self.micro_batch)
            yield mine, torch.from_numpy(self.cache.rows(mine).astype(np.int64))


def eval_batches(shards: list[Shard], *, num_batches: int, micro_batch: int, rank: int, world_size: int,
                 vocab_size: int | None = None):
    """The same fixed validation rows for every evaluation (rows 0.. of the
    split, wrapping round a small split), dealt round-robin to ranks, so
    losses are comparable across evals and across runs."""
    cache = ShardCache(shards, vocab_size=vocab_size)
    total = sum(s.rows for s in shards)
    for k in range(num_batches):
        start = (k * world_size + rank) * micro_batch
        idx = np.arange(start, start + micro_batch) % total
        yield torch.from_numpy(cache.rows(idx).astype(np.int64))
