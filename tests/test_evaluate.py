"""`gptdist eval`: Ray Data batch inference over a whole split equals a
direct in-process computation, counts every row once, gives the same
figures as the in-process path small splits take, and is logged to MLflow
as an eval run."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.manifest import DatasetError, read_manifest, verify_split
from data_pipeline.prepare import prepare_dataset
from gptdist.checkpoint import CheckpointError, clean_state_dict, model_meta, save_checkpoint
from gptdist.config import Config
from gptdist import evaluate
from gptdist.evaluate import (EvalError, Progress, check_every_row_once, evaluate_in_process, evaluate_split,
                              fits_in_process, log_eval_run)
from gptdist.model import GPT, preset

BLOCK = 32


@pytest.fixture(scope="module")
def ray_local(own_ray):
    import ray

    # address="local": a new cluster even when another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    """A small corpus of random words prepared by `gptdist prepare`'s library
    function: block_size 32, shards of 8 rows, so a split spans several
    shards and batches of 4 never line up with them."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sword", "night", "crown", "love", "death", "Rome", "hath"]
    docs = [" ".join(rng.choice(words, size=rng.integers(20, 80))) for _ in range(60)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset([str(root / "corpus.jsonl")], root / "prepared", block_size=BLOCK,
                    val_fraction=0.3, rows_per_shard=8)
    return root / "prepared"


def split_rows(data_dir, split: str) -> int:
    return read_manifest(data_dir)["splits"][split]["rows"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(preset("nano", block_size=BLOCK)).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(folder, clean_state_dict(model), None, {"model": model_meta(model.config), "step": 42})
    return folder, model


def direct_loss(model: GPT, data_dir, split: str) -> float:
    """The same quantity without Ray: mean next-token loss over all rows."""
    table = pa.concat_tables(pq.read_table(p) for p in verify_split(data_dir, split))
    ids = np.stack(table.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64)
    tokens = torch.from_numpy(ids)
    with torch.no_grad():
        _, loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
    return loss.item()


@pytest.fixture(scope="module")
def val_on_ray(ray_local, dataset, checkpoint):
    """The val split through Ray Data: two actors of one thread each."""
    return evaluate_split(checkpoint[0], dataset, "val", num_actors=2, cpus_per_actor=0.5)


def test_eval_equals_direct_computation_and_counts_every_row(val_on_ray, dataset, checkpoint):
    folder, model = checkpoint
    result = val_on_ray
    rows = split_rows(dataset, "val")
    assert rows > 8  # more than one shard
    assert result["rows"] == rows and result["tokens"] == rows * BLOCK and result["step"] == 42
    assert abs(result["loss"] - direct_loss(model, dataset, "val")) < 1e-5
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_in_process_gives_the_same_figures_as_ray_data(val_on_ray, dataset, checkpoint):
    """Other batches (3 rows, across the 8-row shards), other thread count,
    other order: the same loss to the last bit, rows and tokens."""
    result = evaluate_in_process(checkpoint[0], dataset, "val", batch_size=3, num_threads=2)
    assert result == val_on_ray


def test_the_command_takes_ray_data_only_for_a_large_split(val_on_ray, dataset, checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "keep_freed_memory", lambda: None)  # malloc of this pytest process
    assert fits_in_process(dataset, "val") and fits_in_process(dataset, "train")
    assert evaluate.evaluate(Config(), checkpoint[0], dataset, "val") == val_on_ray
    assert "in this process" in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "IN_PROCESS_MAX_TOKENS", split_rows(dataset, "val") * BLOCK - 1)
    assert not fits_in_process(dataset, "val")
    assert evaluate.evaluate(Config(), checkpoint[0], dataset, "val") == val_on_ray  # the running Ray, one actor
    assert "in this process" not in capsys.readouterr().err


def test_a_missing_split_is_named_without_starting_ray(dataset, checkpoint):
    assert fits_in_process(dataset, "test")
    with pytest.raises(DatasetError, match="no split 'test'"):
        evaluate_in_process(checkpoint[0], dataset, "test")


def test_progress_line_at_most_every_interval():
    out = io.StringIO()
    progress = Progress(10, interval_s=0.0, out=out)
    progress.advance(4)
    assert out.getvalue().startswith("eval: 4/10 rows")
    quiet = Progress(10, out=out)  # the default interval: a short evaluation prints nothing
    quiet.advance(10)
    assert out.getvalue().count("eval:") == 1


def test_row_check_catches_missing_and_repeated_rows():
    check_every_row_once(np.array([2, 0, 1]), 3, "val")
    with pytest.raises(EvalError, match="expected rows 0..3"):
        check_every_row_once(np.array([0, 1, 2]), 4, "val")
    with pytest.raises(EvalError, match="1 repeated"):
        check_every_row_once(np.array([0, 1, 1, 2]), 4, "val")


def tracking_config(tmp_path) -> Config:
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.tracking.runs_dir = str(tmp_path / "runs")
    return cfg


def test_eval_run_is_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tracking_config(tmp_path)
    result = {"split": "val", "loss": 2.5, "perplexity": math.exp(2.5), "rows": 7, "tokens": 224,
              "step": 42, "checkpoint": str(tmp_path / "ckpt"), "data_dir": "data"}
    # the experiment does not exist yet: eval creates it, artifacts under runs_dir
    run_id = log_eval_run(cfg, result, "ckpt", source_run_id=None)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.artifact_location.startswith((tmp_path / "runs").as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "eval-val-ckpt" and run.info.status == "FINISHED"
    assert run.data.tags["gptdist.run_kind"] == "eval"
    assert "gptdist.source_run_id" not in run.data.tags
    assert run.data.metrics == {"eval/val/loss": 2.5, "eval/val/perplexity": pytest.approx(math.exp(2.5))}
    assert run.data.params["rows"] == "7" and run.data.params["step"] == "42"


def test_cli_eval_of_a_run_name_uses_its_dataset_and_tags_its_source(
    dataset, checkpoint, tmp_path, capsys, monkeypatch
):
    """End to end: a training run in MLflow whose checkpoint records its
    dataset; `gptdist eval --from <run name>` finds both."""
    from mlflow.tracking import MlflowClient

    from gptdist.cli import main as cli_main

    monkeypatch.setattr(evaluate, "keep_freed_memory", lambda: None)  # malloc of this pytest process
    _, model = checkpoint
    folder = save_checkpoint(tmp_path / "ckpt", clean_state_dict(model), None,
                             {"model": model_meta(model.config), "step": 7, "data_path": str(dataset)})
    cfg = tracking_config(tmp_path)
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = client.create_experiment(cfg.tracking.experiment,
                                             artifact_location=(tmp_path / "artifacts").as_uri())
    train_run = client.create_run(experiment_id, run_name="gpt-nano").info.run_id
    client.log_artifacts(train_run, str(folder), "model")
    argv = ["eval", "--from", "gpt-nano", "--split", "train",
            "--set", f"tracking.uri={cfg.tracking.uri}", "--set", f"tracking.runs_dir={cfg.tracking.runs_dir}"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    loss = direct_loss(model, dataset, "train")
    assert f"loss {loss:.4f}" in out and f"over {split_rows(dataset, 'train')} rows" in out
    [run] = client.search_runs([experiment_id], "tags.`gptdist.run_kind` = 'eval'")
    assert run.data.tags["gptdist.source_run_id"] == train_run
    assert run.info.run_name == "eval-train-gpt-nano"
    assert abs(run.data.metrics["eval/train/loss"] - loss) < 1e-5


def test_checkpoint_of_another_shape_is_a_clear_error(dataset, tmp_path):
    torch.manual_seed(0)
    micro = GPT(preset("micro", block_size=BLOCK))
    folder = save_checkpoint(tmp_path / "ckpt", clean_state_dict(micro), None,
                             {"model": model_meta(preset("nano", block_size=BLOCK)), "step": 0})
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 2 vs model 4"):
        evaluate_split(folder, dataset, "val")
