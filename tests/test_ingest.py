"""Ray Data ingest: each rank's dataset holds exactly the rows `stream`
plans for it, from the resumed step on (real Ray Data on a local Ray)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.ingest import (
    DATASET_NAME,
    DataStreamMismatch,
    RayDataStream,
    RowOrderDataConfig,
    RowPlan,
    shard_listing,
)
from data_pipeline.rank_rows import rank_items
from data_pipeline.stream import TrainStream
from test_stream import write_shards

pytestmark = pytest.mark.slow


def planned_rows(shards, plan, world, steps):
    """What the direct-read reference stream trains: {(step, rank): rows}."""
    out = {}
    for rank in range(world):
        s = TrainStream(shards, seed=plan.seed, global_batch=plan.global_batch, micro_batch=plan.micro_batch,
                        rank=rank, world_size=world)
        for step in steps:
            out[(step, rank)] = [r for rows, _ in s.micro_batches(step) for r in rows.tolist()]
    return out


def ingested_rows(shards, plan, world, start_step=None):
    iterators = RowOrderDataConfig(plan, start_step).configure(
        {DATASET_NAME: shard_listing(shards)}, world, None, None)
    out = {}
    for rank, its in enumerate(iterators):
        for batch in its[DATASET_NAME].iter_batches(batch_size=plan.micro_batch, batch_format="numpy"):
            assert np.array_equal(batch["tokens"][:, 0], batch["row"])  # the row's own tokens
            assert len(set(batch["step"].tolist())) == 1  # a micro-batch never straddles two steps
            out.setdefault((int(batch["step"][0]), rank), []).extend(batch["row"].tolist())
    return out


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 2), (4, 1)])
def test_rank_datasets_match_the_planned_rows(tmp_path, ray_local, world, micro):
    shards = write_shards(tmp_path, [7, 5, 9, 11])  # 32 rows: 4 steps per epoch of 8
    plan = RowPlan(seed=3, global_batch=8, micro_batch=micro, max_steps=10)  # crosses two epoch ends
    assert ingested_rows(shards, plan, world) == planned_rows(shards, plan, world, range(10))


def test_a_resumed_run_starts_at_the_checkpoint_step(tmp_path, ray_local):
    shards = write_shards(tmp_path, [7, 5, 9, 11])
    plan = RowPlan(seed=3, global_batch=8, micro_batch=2, max_steps=9)
    rows = ingested_rows(shards, plan, 2, start_step=lambda: 6)  # the driver's resume_step
    assert sorted({step for step, _ in rows}) == [6, 7, 8]
    assert rows == planned_rows(shards, plan, 2, range(6, 9))


def test_items_cover_each_epoch_position_once():
    from data_pipeline.stream import Shard

    shards = [Shard("a", 0, 7), Shard("b", 7, 5), Shard("c", 12, 9)]  # 21 rows, 2 steps of 8 per epoch
    items = rank_items(shards, RowPlan(seed=0, global_batch=8, micro_batch=8, max_steps=5), start_step=1)
    spans = [(i["epoch"], i["begin"], i["end"]) for i in items]
    for epoch, (lo, hi) in [(0, (8, 16)), (1, (0, 16)), (2, (0, 8))]:  # steps 1 | 2,3 | 4
        covered = sorted(p for e, b, en in spans if e == epoch for p in range(b, en))
        assert covered == list(range(lo, hi))  # the 5 rows left over per epoch are never read


def test_a_stream_at_another_step_is_refused(tmp_path, ray_local):
    shards = write_shards(tmp_path, [16])
    plan = RowPlan(seed=0, global_batch=8, micro_batch=8, max_steps=2)
    (it,) = (its[DATASET_NAME] for its in RowOrderDataConfig(plan, None).configure(
        {DATASET_NAME: shard_listing(shards)}, 1, None, None))
    stream = RayDataStream(it, shards, global_batch=8, micro_batch=8, world_size=1, prefetch_batches=1)
    with pytest.raises(DataStreamMismatch, match="data stream is at step 0, training at step 1"):
        list(stream.micro_batches(1))


def test_the_reader_module_imports_neither_torch_nor_ray_train():
    """Each run starts a Ray Data reader actor per rank, which imports the
    module of `RankRowReader`: without torch and Ray Train it starts seconds
    sooner."""
    code = "import sys, data_pipeline.rank_rows; print(sorted({'torch', 'ray.train'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
