"""What each rank trains, as Ray Data's reader actors compute it: the row
plan, the rank of each epoch-order position, the read items a run still
visits, and `RankRowReader`, the map that turns one item into that rank's
rows (`data_pipeline.ingest` builds the datasets around it).

A module of its own, importing neither torch nor Ray Train: every run
starts a reader actor per rank, which imports the module of the class it
runs, and on a 2-core machine torch and Ray Train cost it 3-5 s of CPU
before the first batch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from data_pipeline.stream import Shard, epoch_order, read_shard_tokens, steps_per_epoch


@dataclass(frozen=True)
class RowPlan:
    """What decides which rows each rank trains at each step."""

    seed: int
    global_batch: int
    micro_batch: int
    max_steps: int
    vocab_size: int | None = None


def rank_of_position(positions: np.ndarray, global_batch: int, micro_batch: int, world_size: int) -> np.ndarray:
    """Which rank trains each position of an epoch's order: the inverse of
    `stream.rows_for_micro_step` (micro-step m of rank r holds the step's
    slots [(m*W + r)*b, (m*W + r + 1)*b))."""
    return ((positions % global_batch) // micro_batch) % world_size


def rank_items(shards: list[Shard], plan: RowPlan, start_step: int) -> list[dict]:
    """The spans of epoch-order positions the run still trains, from
    `start_step` to `plan.max_steps`, cut at shard boundaries: one read
    item each, in training order."""
    spe = steps_per_epoch(shards, plan.global_batch)
    items = []
    step = start_step
    while step < plan.max_steps:
        epoch, j = divmod(step, spe)
        last_step = min((epoch + 1) * spe, plan.max_steps)  # exclusive, in this epoch
        begin, end = j * plan.global_batch, (last_step - epoch * spe) * plan.global_batch
        rng = np.random.default_rng([plan.seed, epoch])
        pos = 0
        for k in rng.permutation(len(shards)):  # the shard order of epoch_order
            lo, hi = max(begin, pos), min(end, pos + shards[k].rows)
            if lo < hi:
                items.append({"epoch": epoch, "shard": int(k), "begin": lo, "end": hi})
            pos += shards[k].rows
        step = last_step
    return items


@functools.lru_cache(maxsize=2)
def _cached_epoch_order(shards: tuple[Shard, ...], seed: int, epoch: int) -> np.ndarray:
    return epoch_order(list(shards), seed, epoch)


class RankRowReader:
    """Ray Data map: one item (a span of one shard) -> this rank's rows of
    it, in epoch order: `tokens` (n, T+1) uint16, `row`, `step`."""

    def __init__(self, shards: list[Shard], plan: RowPlan, rank: int, world_size: int):
        self.shards = tuple(shards)
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch(shards, plan.global_batch)

    def __call__(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, k = int(item["epoch"][0]), int(item["shard"][0])
        positions = np.arange(int(item["begin"][0]), int(item["end"][0]))
        positions = positions[rank_of_position(positions, self.plan.global_batch, self.plan.micro_batch,
                                               self.world_size) == self.rank]
        rows = _cached_epoch_order(self.shards, self.plan.seed, epoch)[positions]
        shard = self.shards[k]
        tokens = read_shard_tokens(shard.path, self.plan.vocab_size)[rows - shard.first_row]
        return {
            "tokens": tokens,
            "row": rows,
            "step": epoch * self.steps_per_epoch + positions // self.plan.global_batch,
        }
