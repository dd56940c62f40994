"""Loss and perplexity of a checkpoint over a whole prepared split.

Runs as Ray Data batch inference: the split (`data_pipeline.reader.
open_split`) flows through a fixed pool of model actors, each batch coming
back as per-row summed token loss and token count. The result is exact, not
an estimate: the row indices that come back must be exactly 0..N-1 of the
split, each once, or the evaluation fails. The loss is the mean next-token
cross-entropy over every token of the split, the quantity training reports
as val/loss on a few batches; perplexity is exp(loss).

The model's weights travel to the actors through the Ray object store, so
the actors need not see the driver's disk (a checkpoint downloaded from
MLflow on the driver works on a multi-node cluster).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptdist.checkpoint import model_meta
from gptdist.checkpoint_source import load_inference_state
from gptdist.model import GPT, GPTConfig
from gptdist.redaction import redact_text, redact_uri

SOURCE_RUN_TAG = "gptdist.source_run_id"
BATCHES_PER_BLOCK = 4


class EvalError(RuntimeError):
    pass


class TokenLossModel:
    """Ray Data actor: holds one model, maps a batch of `tokens` rows
    (block_size + 1 ids each) to per-row summed loss and token count."""

    def __init__(self, state_ref, shape: dict[str, Any], num_threads: int = 1, use_gpu: bool = False):
        import ray

        torch.set_num_threads(num_threads)  # Ray's OMP_NUM_THREADS is not a torch setting
        state = ray.get(state_ref) if isinstance(state_ref, ray.ObjectRef) else state_ref
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
    """Evaluate the checkpoint in `model_folder` on every row of `split`.
    Uses the running Ray (Ray Data starts a local one if there is none)."""
    import ray

    from data_pipeline.manifest import read_manifest
    from data_pipeline.reader import open_split

    state, config, meta = load_inference_state(model_folder)
    dataset = open_split(data_dir, split, config.block_size)  # checks shards against the manifest
    expected_rows = read_manifest(data_dir)["splits"][split]["rows"]
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
    rows, loss_sum, tokens = collect(results)
    check_every_row_once(rows, expected_rows, split)
    loss = loss_sum / tokens
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


def collect(results) -> tuple[np.ndarray, float, int]:
    """(row indices seen, total loss, total tokens); sums in float64 so the
    total does not depend on how Ray cut the batches."""
    rows, loss_sum, tokens = [], 0.0, 0
    for batch in results.iter_batches(batch_format="numpy", batch_size=None):
        rows.append(np.asarray(batch["row"], dtype=np.int64))
        loss_sum += float(np.sum(batch["loss_sum"], dtype=np.float64))
        tokens += int(np.sum(batch["tokens"]))
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), loss_sum, tokens


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
    from mlflow.tracking import MlflowClient

    from gptdist import tracking

    uri = tracking.tracking_uri(cfg.tracking)
    client = MlflowClient(uri)
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

    from gptdist.trainer import connect_ray, use_gpu

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
            ray.shutdown()


def eval_main(args) -> int:
    """`gptdist eval`: loss and perplexity over a split, logged to MLflow
    (a tracking failure only warns when tracking.required is false)."""
    from data_pipeline.manifest import DatasetError
    from gptdist.checkpoint import CheckpointError, read_meta
    from gptdist.checkpoint_source import resolve_source
    from gptdist.config import load_config
    from gptdist.tracking import tracking_uri

    cfg = load_config(args.config, args.overrides)
    try:
        # Resolve before Ray starts: a wrong --from costs no cluster start-up.
        resolved = resolve_source(args.source, cfg)
        data_dir = args.data or default_data_dir(read_meta(resolved.path), cfg)
        result = evaluate_on_cluster(cfg, resolved.path, data_dir, args.split)
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
