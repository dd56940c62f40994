"""Loss and perplexity of a checkpoint over a whole prepared split.

Two ways to run, one result. A small split (at most IN_PROCESS_MAX_TOKENS)
is evaluated in this process, reading the verified shards with pyarrow:
starting Ray and its actor pool takes longer than the whole pass (the
bench's small-commands section times `gptdist eval` of the Shakespeare val
split). A larger one runs as Ray Data batch inference: the split
(`data_pipeline.reader.open_split`) flows through a fixed pool of model
actors on the configured Ray (local or a cluster, one actor per GPU).

Both map batches of rows through the same `TokenLossModel` to per-row
summed token loss and token count, and reduce them the same way, so they
give identical figures: a row's loss does not depend on the batch it came
in (tests/test_evaluate.py checks it on the CPU; a GPU's kernels may round
other batch shapes differently), and the total is an exactly rounded sum
(`math.fsum`) that does not depend on the order rows come back. The result is exact, not an estimate:
the row indices that come back must be exactly 0..N-1 of the split, each
once, or the evaluation fails. The loss is the mean next-token
cross-entropy over every token of the split, the quantity training reports
as val/loss on a few batches; perplexity is exp(loss).

On the Ray path the model's weights travel to the actors through the Ray
object store, so the actors need not see the driver's disk (a checkpoint
downloaded from MLflow on the driver works on a multi-node cluster).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from data_pipeline import storage
from data_pipeline.manifest import read_manifest, storage_errors, verify_split
from gptdist.checkpoint import model_meta
from gptdist.checkpoint_source import load_inference_state
from gptdist.model import GPT, GPTConfig
from gptdist.redaction import redact_text, redact_uri

SOURCE_RUN_TAG = "gptdist.source_run_id"
BATCHES_PER_BLOCK = 4
# Splits up to this many tokens (512 rows of 512) are evaluated in-process:
# one process on a small machine's cores gets through them in a minute or
# two, and Ray's start-up would be a large share of that. Above it Ray's
# start-up is a small share, and a cluster's or several GPUs' actors pay.
IN_PROCESS_MAX_TOKENS = 1 << 18
PROGRESS_INTERVAL_S = 5.0
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc mallopt parameters (malloc.h)


class EvalError(RuntimeError):
    pass


class TokenLossModel:
    """Holds one model, maps a batch of `tokens` rows (block_size + 1 ids
    each) to per-row summed loss and token count. A Ray Data actor on the
    Ray path (the weights then come as an object reference), a plain
    callable in-process."""

    def __init__(self, state_ref, shape: dict[str, Any], num_threads: int = 1, use_gpu: bool = False):
        torch.set_num_threads(num_threads)  # Ray's OMP_NUM_THREADS is not a torch setting
        if isinstance(state_ref, dict):
            state = state_ref
        else:
            import ray

            state = ray.get(state_ref)
        self.device = "cuda" if use_gpu else "cpu"
        self.model = GPT(GPTConfig(**shape))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = torch.from_numpy(token_matrix(batch["tokens"])).to(self.device)
        loss_sum, count = row_losses(self.model, tokens)
        return {"row": np.asarray(batch["row"], dtype=np.int64), "loss_sum": loss_sum, "tokens": count}


def token_matrix(column: np.ndarray) -> np.ndarray:
    """(B, block_size+1) int64 ids. A fixed-size-list column can arrive as an
    object array of rows; uint16 ids are widened for the embedding lookup."""
    if column.dtype == object:
        column = np.stack(column)
    return column.astype(np.int64)


@torch.no_grad()
def row_losses(model: GPT, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-row summed next-token loss (float64) and the number of predicted
    tokens, for rows of block_size + 1 ids."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits, _, _ = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    loss_sum = loss.view(y.shape).double().sum(dim=1).cpu().numpy()
    return loss_sum, np.full(y.shape[0], y.shape[1], dtype=np.int64)


def evaluate_split(
    model_folder: str | Path,
    data_dir: str | Path,
    split: str = "val",
    num_actors: int = 1,
    batch_size: int = 4,
    cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Evaluate the checkpoint in `model_folder` on every row of `split`
    with Ray Data. Uses the running Ray (Ray Data starts a local one if
    there is none)."""
    import ray

    from data_pipeline.reader import open_split

    state, config, meta = load_inference_state(model_folder)
    dataset = open_split(data_dir, split, config.block_size)  # checks shards against the manifest
    expected_rows = split_rows(data_dir, split)
    # A shard is read as one block, and a block goes to one actor: cut the
    # blocks small (streaming, no shuffle) so every actor of the pool gets work.
    dataset = dataset.repartition(target_num_rows_per_block=batch_size * BATCHES_PER_BLOCK)
    results = dataset.map_batches(
        TokenLossModel,
        fn_constructor_kwargs=dict(
            state_ref=ray.put(state),
            shape=model_meta(config),
            num_threads=max(1, int(cpus_per_actor)),
            use_gpu=use_gpu,
        ),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    progress = Progress(expected_rows)
    batches = results.iter_batches(batch_format="numpy", batch_size=None)
    return summarize(collect(progress.follow(batches)), expected_rows, split, meta, model_folder, data_dir)


def evaluate_in_process(
    model_folder: str | Path,
    data_dir: str | Path,
    split: str = "val",
    batch_size: int = 4,
    num_threads: int | None = None,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """`evaluate_split` without Ray: the same rows through the same model
    call in this process, `num_threads` torch threads (default: every core
    this process may use)."""
    state, config, meta = load_inference_state(model_folder)
    locations = verify_split(data_dir, split, block_size=config.block_size)
    expected_rows = split_rows(data_dir, split)
    model = TokenLossModel(state, model_meta(config), num_threads or usable_cores(), use_gpu)
    progress = Progress(expected_rows)
    batches = (model(batch) for batch in read_rows(data_dir, locations, batch_size))
    return summarize(collect(progress.follow(batches)), expected_rows, split, meta, model_folder, data_dir)


def read_rows(data_dir: str | Path, locations: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `row` and `tokens` ((B, block_size + 1) uint16) from the
    shards, a row group at a time: memory stays at a batch, not the split."""
    with storage_errors(f"reading {data_dir}"):
        for location in locations:
            with storage.open_input_file(location) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["row", "tokens"]):
                    tokens = batch.column("tokens")
                    yield {"row": batch.column("row").to_numpy(),
                           "tokens": tokens.flatten().to_numpy().reshape(len(tokens), tokens.type.list_size)}


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow
    fewer than the machine has). Not torch's default thread count: a
    `ray job submit` driver runs with OMP_NUM_THREADS=1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_rows(data_dir: str | Path, split: str) -> int:
    return read_manifest(data_dir)["splits"][split]["rows"]


class Progress:
    """`eval: N/M rows` on stderr at most every `interval_s`, so a long
    evaluation shows it is moving; one that ends sooner prints nothing."""

    def __init__(self, total_rows: int, interval_s: float = PROGRESS_INTERVAL_S, out=None):
        self.total_rows = total_rows
        self.interval_s = interval_s
        self.out = out
        self.rows = 0
        self.started = self.last = time.monotonic()

    def follow(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            self.advance(len(batch["row"]))
            yield batch

    def advance(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            rate = self.rows / (now - self.started)
            print(f"eval: {self.rows}/{self.total_rows} rows ({rate:,.1f} rows/s)",
                  file=self.out or sys.stderr, flush=True)
            self.last = now


def collect(batches) -> tuple[np.ndarray, np.ndarray, int]:
    """(row indices seen, each row's summed loss, total tokens) over the
    batches `TokenLossModel` returned, in whatever order they came."""
    rows, loss_sums, tokens = [], [], 0
    for batch in batches:
        rows.append(np.asarray(batch["row"], dtype=np.int64))
        loss_sums.append(np.asarray(batch["loss_sum"], dtype=np.float64))
        tokens += int(np.sum(batch["tokens"]))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), 0
    return np.concatenate(rows), np.concatenate(loss_sums), tokens


def summarize(collected: tuple[np.ndarray, np.ndarray, int], expected_rows: int, split: str,
              meta: dict[str, Any], model_folder: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """The result of either path, after checking every row came back once.
    `math.fsum` is exactly rounded, so the loss does not depend on how the
    batches were cut or the order they arrived in."""
    rows, loss_sums, tokens = collected
    check_every_row_once(rows, expected_rows, split)
    loss = math.fsum(loss_sums.tolist()) / tokens
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(loss),
        "rows": int(rows.size),
        "tokens": int(tokens),
        "step": meta.get("step"),
        "checkpoint": str(model_folder),
        "data_dir": str(data_dir),
    }


def check_every_row_once(rows: np.ndarray, expected: int, split: str) -> None:
    if expected == 0:
        raise EvalError(f"split {split!r} has no rows")
    if rows.size != expected or not np.array_equal(np.sort(rows), np.arange(expected)):
        seen = np.unique(rows)
        raise EvalError(
            f"split {split!r}: expected rows 0..{expected - 1} once each, got {rows.size} rows "
            f"({seen.size} distinct, {rows.size - seen.size} repeated)"
        )


# --- the command ------------------------------------------------------------


def default_data_dir(meta: dict[str, Any], cfg) -> str:
    """The dataset the checkpoint was trained on, else data.path."""
    recorded = meta.get("data_path")
    if recorded and Path(recorded).is_dir():
        return recorded
    if recorded:
        print(f"note: the checkpoint's dataset {recorded} is not here; using data.path={cfg.data.path}",
              file=sys.stderr)
    return cfg.data.path


def log_eval_run(cfg, result: dict[str, Any], source: str, source_run_id: str | None) -> str:
    """Record the evaluation as its own MLflow run; returns its id."""
    from gptdist import tracking

    uri = tracking.tracking_uri(cfg.tracking)
    client = tracking.mlflow_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, cfg.tracking, uri)
    tags = {tracking.RUN_KIND_TAG: "eval", "gptdist.source": source}
    if source_run_id:
        tags[SOURCE_RUN_TAG] = source_run_id
    run = client.create_run(experiment_id, run_name=eval_run_name(client, result, source, source_run_id),
                            tags=tags)
    run_id = run.info.run_id
    for key in ("checkpoint", "data_dir", "split", "rows", "tokens", "step"):
        client.log_param(run_id, key, str(result[key]))
    step = result["step"] or 0
    split = result["split"]
    client.log_metric(run_id, f"eval/{split}/loss", result["loss"], step=step)
    client.log_metric(run_id, f"eval/{split}/perplexity", result["perplexity"], step=step)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def eval_run_name(client, result: dict[str, Any], source: str, source_run_id: str | None) -> str:
    """eval-<split>-<training run name>, else the checkpoint folder's name."""
    from mlflow.exceptions import MlflowException

    name = Path(result["checkpoint"]).name
    if source_run_id:
        try:
            name = client.get_run(source_run_id).info.run_name
        except MlflowException:  # a run id recorded by another tracking server
            pass
    return f"eval-{result['split']}-{name}"


def evaluate_on_cluster(cfg, model_folder: Path, data_dir: str, split: str) -> dict[str, Any]:
    """Join or start Ray as training does, size the actor pool to it, evaluate."""
    import ray

    from gptdist.ray_session import connect_ray, shutdown_ray, use_gpu

    started = connect_ray(cfg)
    try:
        gpu = use_gpu(cfg)
        if gpu:  # one actor per GPU
            num_actors, cpus = max(1, int(ray.cluster_resources().get("GPU", 1))), 1.0
        else:  # one CPU stays free for reading; more than 8 copies of the model buy little
            num_actors, cpus = max(1, min(8, int(ray.cluster_resources().get("CPU", 2)) - 1)), 1.0
        return evaluate_split(model_folder, data_dir, split, num_actors=num_actors,
                              cpus_per_actor=cpus, use_gpu=gpu)
    finally:
        if started:
            shutdown_ray()


def fits_in_process(data_dir: str | Path, split: str) -> bool:
    """Whether `split` is small enough to evaluate without Ray (see
    IN_PROCESS_MAX_TOKENS). A split the manifest lacks counts as small: the
    in-process path then names the problem without starting Ray."""
    manifest = read_manifest(data_dir)
    entry = manifest["splits"].get(split)
    return entry is None or entry["rows"] * (manifest["row_length"] - 1) <= IN_PROCESS_MAX_TOKENS


def evaluate(cfg, model_folder: Path, data_dir: str, split: str) -> dict[str, Any]:
    """In this process for a small split, else on Ray (`evaluate_on_cluster`)."""
    if not fits_in_process(data_dir, split):
        return evaluate_on_cluster(cfg, model_folder, data_dir, split)
    gpu = cfg.ray.use_gpu == "true" or (cfg.ray.use_gpu == "auto" and torch.cuda.is_available())
    if cfg.ray.worker_keeps_freed_memory:
        keep_freed_memory()
    print(f"evaluating split {split!r} in this process (at most {IN_PROCESS_MAX_TOKENS:,} tokens: "
          "no Ray needed)", file=sys.stderr)
    return evaluate_in_process(model_folder, data_dir, split, use_gpu=gpu)


def keep_freed_memory() -> None:
    """Have this process's glibc malloc reuse freed memory rather than hand
    it back to the kernel. Each batch's logits and their log-softmax (B x T x
    V fp32: 400 MB each at batch 4 of 512 tokens, GPT-2's vocabulary) are
    otherwise fresh pages the kernel faults in and zeroes, twice a batch:
    measured on 2 cores, as much system time as the model's own compute.
    Training workers get the same settings from their environment
    (worker_contract.WORKER_MALLOC_ENV); this process is already running, hence
    mallopt. Not glibc (macOS, musl): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest it takes
    mallopt(M_TOP_PAD, 64 * 2**20)


def eval_main(args) -> int:
    """`gptdist eval`: loss and perplexity over a split, logged to MLflow
    (a tracking failure only warns when tracking.required is false)."""
    from data_pipeline.manifest import DatasetError
    from gptdist.checkpoint import CheckpointError, read_meta
    from gptdist.checkpoint_source import resolve_source
    from gptdist.tracking import tracking_uri

    cfg = args.cfg  # loaded and checked by cli.run
    try:
        # Resolve before Ray may start: a wrong --from costs no cluster start-up.
        resolved = resolve_source(args.source, cfg)
        data_dir = args.data or default_data_dir(read_meta(resolved.path), cfg)
        result = evaluate(cfg, resolved.path, data_dir, args.split)
    except (CheckpointError, DatasetError, EvalError, ConnectionError) as e:
        print(f"gptdist eval: {e}", file=sys.stderr)
        return 1
    print(f"{result['split']}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"over {result['rows']} rows / {result['tokens']} tokens (step {result['step']})")
    try:
        run_id = log_eval_run(cfg, result, args.source, resolved.run_id)
    except Exception as e:
        print(f"gptdist eval: could not log to MLflow at {redact_uri(tracking_uri(cfg.tracking))}: "
              f"{redact_text(str(e))}",
              file=sys.stderr)
        return 1 if cfg.tracking.required else 0
    print(f"logged as MLflow run {run_id} in experiment '{cfg.tracking.experiment}'")
    return 0
