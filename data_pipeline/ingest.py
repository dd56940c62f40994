"""Ray Data feeds the training workers, row for row as `stream` defines.

The trainer is given the train split as a Ray Dataset (one item per shard:
its location and row range) and `RowOrderDataConfig`. When the workers ask
for their shard (`ray.train.get_dataset_shard("train")`), the config turns
that listing into one Ray Dataset per rank:

    items:  (epoch, shard, span of epoch-order positions in that shard)
            for every shard the run still visits, from the resumed step on
    map:    `RankRowReader` reads the shard with pyarrow (local disk or any
            filesystem pyarrow reads: s3://, gs://, ...) and keeps the rows
            of this rank, in epoch order, with their global row and step

and the worker iterates it with `iter_torch_batches` (prefetching in the
background, so reading overlaps the step). One micro-batch is one batch.

The guarantees of `data_pipeline.stream` hold by construction:

* Order and rank slicing are computed by the same functions
  (`epoch_order`, `rank_of_position`), so a rank's rows are exactly the rows
  `TrainStream` gives it, for any worker count.
* Resume. Ray Data iterators cannot be checkpointed or sought
  (ray-project/ray#37633, #48224), so nothing is skipped at run time: each
  rank's dataset *starts* at the resumed step. The driver gives the config
  a function that returns that step, the step of the run's latest
  checkpoint (`gptdist.checkpoint_source.resume_step`: the checkpoint Ray
  Train records in its snapshot and hands the restarted workers, or the
  complete one before it when that one is incomplete), and the config calls
  it each time Ray Train (re)starts the workers. Every row carries its
  step; the worker checks the first batch against the step its checkpoint
  restored and stops with an error if they ever disagree.
* No row is trained twice or skipped: positions are consumed in order,
  `global_batch` per step, and the `N mod G` rows left at the end of an
  epoch's order are dropped as `stream` states.

Why not `read_parquet` + `streaming_split`: a streaming split deals blocks
to workers by timing, and Ray Data may cut a Parquet file into several
blocks, so neither which rows a rank trains nor where to restart could be
known. Reading a shard per item keeps both exact; the read still runs in
Ray Data tasks, in the background, from any filesystem.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import ray
import ray.data
import ray.train

from data_pipeline.rank_rows import RankRowReader, RowPlan, rank_items
from data_pipeline.stream import Shard, data_position, micro_steps, steps_per_epoch

DATASET_NAME = "train"


def rank_dataset(shards: list[Shard], plan: RowPlan, rank: int, world_size: int, start_step: int,
                 read_cpus: float, env: dict[str, str] | None = None) -> ray.data.Dataset:
    # Nothing left to train (resumed at max_steps): one empty span, so the
    # dataset still has the columns the worker expects.
    items = rank_items(shards, plan, start_step) or [{"epoch": 0, "shard": 0, "begin": 0, "end": 0}]
    # One read per shard visit, by one reader actor that keeps the epoch's
    # order: the shard is read once per rank, the order computed once per epoch.
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        RankRowReader, fn_constructor_args=(shards, plan, rank, world_size), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=read_cpus,
        **({"runtime_env": {"env_vars": env}} if env else {}))


def shard_listing(shards: list[Shard]) -> ray.data.Dataset:
    """The train split as the trainer's dataset: one item per shard."""
    return ray.data.from_items([{"path": s.path, "first_row": s.first_row, "rows": s.rows} for s in shards])


class RowOrderDataConfig(ray.train.DataConfig):
    """Gives each rank its own dataset of exactly its rows, starting at the
    resumed step (see the module docstring), instead of splitting one
    dataset among the workers."""

    def __init__(self, plan: RowPlan, start_step: Callable[[], int] | None = None, read_cpus: float = 0.25,
                 env: dict[str, str] | None = None):
        super().__init__(datasets_to_split=[DATASET_NAME])
        self.plan = plan
        self.start_step = start_step  # None: always from step 0
        self.read_cpus = read_cpus
        # The driver's object-store endpoint (storage.endpoint_env): this
        # config runs in a Ray actor, its readers in Ray tasks, neither of
        # which sees the driver's shell.
        self.env = env or {}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        os.environ.update(self.env)  # an actor of Ray Train's own, for the datasets alone
        quiet_ingest(ray.data.DataContext.get_current())
        listing = datasets[DATASET_NAME].take_all()
        shards = [Shard(r["path"], int(r["first_row"]), int(r["rows"])) for r in listing]
        start = self.start_step() if self.start_step else 0
        output = []
        for rank in range(world_size):
            ds = rank_dataset(shards, self.plan, rank, world_size, start, self.read_cpus, self.env)
            quiet_ingest(ds.context)
            # The rows' order is the training order. (No resource limits: each
            # rank's reader is one actor of `read_cpus`.)
            ds.context.execution_options = ray.data.ExecutionOptions(preserve_order=True)
            ds.set_name(f"{DATASET_NAME}-rank{rank}")
            output.append({DATASET_NAME: ds.iterator()})
        return output


def quiet_ingest(context: ray.data.DataContext) -> None:
    """No progress bars or per-execution banners from the workers' readers:
    a training run's console is its progress lines (Ray's logs keep the rest)."""
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class DataStreamMismatch(RuntimeError):
    pass


class RayDataStream:
    """A worker's micro-batches, step by step, from its Ray Data iterator
    (the same interface as `stream.TrainStream`)."""

    def __init__(self, iterator, shards: list[Shard], *, global_batch: int, micro_batch: int, world_size: int,
                 prefetch_batches: int):
        quiet_ingest(ray.data.DataContext.get_current())
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch(shards, global_batch)
        self.accumulation = micro_steps(global_batch, micro_batch, world_size)
        self._batches = iter(iterator.iter_torch_batches(batch_size=micro_batch, prefetch_batches=prefetch_batches))

    def position(self, step: int) -> dict[str, int]:
        return data_position(step, self.steps_per_epoch, self.global_batch)

    def micro_batches(self, step: int):
        """Yield (row indices, int64 tokens (b, T+1)) for each micro-step of
        `step`; the rows must be the ones planned for that step."""
        for _ in range(self.accumulation):
            batch = next(self._batches, None)
            if batch is None:
                raise DataStreamMismatch(f"the data stream ended before step {step}")
            steps = batch["step"]
            if int(steps.min()) != step or int(steps.max()) != step:
                raise DataStreamMismatch(
                    f"the data stream is at step {int(steps.min())}, training at step {step}: the dataset "
                    "was built for another resume point than the checkpoint restored"
                )
            yield batch["row"].numpy(), batch["tokens"].long()
