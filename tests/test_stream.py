"""The resumable per-worker stream (pure functions, no Ray)."""

import pytest
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.stream import Shard, TrainStream, epoch_order, eval_batches


def write_shards(tmp_path, sizes, width=5):
    shards, first = [], 0
    for i, n in enumerate(sizes):
        rows = np.arange(first, first + n)
        tokens = np.repeat(rows[:, None], width, axis=1).astype(np.uint16)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), width)
        path = tmp_path / f"shard-{i:05d}.parquet"
        pq.write_table(pa.table({"tokens": arr, "row": pa.array(rows)}), path)
        shards.append(Shard(path, first, n))
        first += n
    return shards


def test_epoch_order_is_a_seeded_permutation(tmp_path):
    shards = write_shards(tmp_path, [7, 5, 9])
    a, b = epoch_order(shards, 1, 0), epoch_order(shards, 1, 0)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(21))
    assert not np.array_equal(a, epoch_order(shards, 1, 1))


def stream_rows(shards, steps, world, micro):
    seen = {}
    for rank in range(world):
        s = TrainStream(shards, seed=3, global_batch=8, micro_batch=micro, rank=rank, world_size=world)
        for step in steps:
            for rows, tokens in s.micro_batches(step):
                assert np.array_equal(tokens[:, 0].numpy(), rows)  # the right rows are read
                seen.setdefault(step, []).extend(rows.tolist())
    return {k: sorted(v) for k, v in seen.items()}


def test_any_worker_count_trains_the_same_rows(tmp_path):
    shards = write_shards(tmp_path, [7, 5, 9, 11])
    one = stream_rows(shards, range(8), world=1, micro=4)
    two = stream_rows(shards, range(8), world=2, micro=4)
    four = stream_rows(shards, range(8), world=4, micro=1)
    assert one == two == four
    epoch0 = [r for s in range(4) for r in one[s]]  # 32 rows, 4 steps per epoch
    assert len(epoch0) == len(set(epoch0)) == 32


def test_resume_position(tmp_path):
    shards = write_shards(tmp_path, [10, 10])
    s = TrainStream(shards, seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1)
    assert s.steps_per_epoch == 2
    assert s.position(3) == {"epoch": 1, "epoch_row": 8}
    fresh = TrainStream(shards, seed=0, global_batch=8, micro_batch=8, rank=0, world_size=1)
    assert np.array_equal(s.step_rows(3), fresh.step_rows(3))


def test_eval_batches_are_fixed_and_split_across_ranks(tmp_path):
    shards = write_shards(tmp_path, [6])
    r0 = [b[:, 0].tolist() for b in eval_batches(shards, num_batches=2, micro_batch=2, rank=0, world_size=2)]
    r1 = [b[:, 0].tolist() for b in eval_batches(shards, num_batches=2, micro_batch=2, rank=1, world_size=2)]
    assert r0 == [[0, 1], [4, 5]] and r1 == [[2, 3], [0, 1]]


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    import pytest

    shards = write_shards(tmp_path, [4])  # token value = row index
    s = TrainStream(shards, seed=0, global_batch=4, micro_batch=4, rank=0, world_size=1, vocab_size=3)
    with pytest.raises(ValueError, match=r"shard-00000\.parquet holds token id 3, outside the model's vocabulary of 3"):
        next(s.micro_batches(0))


def test_a_batch_that_does_not_split_is_refused():
    from data_pipeline.stream import micro_steps

    assert micro_steps(16, 4, 2) == 2
    with pytest.raises(ValueError, match="global batch of 10 rows is not divisible by 4 rows x 2 workers"):
        micro_steps(10, 4, 2)
