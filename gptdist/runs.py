"""`gptdist runs`: a table of runs straight from MLflow, to compare them in
the terminal the way the MLflow UI's runs table does in a browser.

Everything comes from one `search_runs` call: MLflow returns each run with
the latest value of every metric it logged, so no metric history is read
(one history query per run and metric took seconds)."""

from __future__ import annotations

import math
from datetime import datetime

from mlflow.entities import Run

from gptdist import tracking
from gptdist.config import Config
from gptdist.redaction import redact_uri

COLUMNS = ["name", "kind", "status", "start", "duration", "dataset", "n_layer", "n_head", "n_embd",
           "params", "steps", "train loss", "val loss", "tokens/s"]
DATASET_TAG = "gptdist.dataset"


class RunsError(ValueError):
    """A `gptdist runs` request that the tracking store cannot answer."""


def shape_of(params: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """n_layer, n_head, n_embd: the run's own values, else its preset's."""
    from gptdist.model_config import PRESETS

    if "model.preset" not in params:  # not a training run (an eval, a tune sweep)
        return None, None, None
    preset = PRESETS.get(params["model.preset"], {})
    return tuple(
        params.get(f"model.{k}") if params.get(f"model.{k}") not in (None, "None") else str(preset.get(k, "?"))
        for k in ("n_layer", "n_head", "n_embd")
    )


def dataset_of(run: Run) -> str | None:
    """The dataset's name as the trainer tagged it, else the last component
    of the folder or URI the run read (an eval run records data_dir)."""
    if DATASET_TAG in run.data.tags:
        return run.data.tags[DATASET_TAG]
    path = run.data.params.get("data.path") or run.data.params.get("data_dir")
    return path.rstrip("/").rsplit("/", 1)[-1] if path else None


def steps_of(run: Run) -> int | None:
    """Steps trained: tokens seen over tokens per step; for an eval run, the
    step of the checkpoint it evaluated."""
    params, metrics = run.data.params, run.data.metrics
    if "tokens_seen" in metrics and "derived.global_batch_tokens" in params:
        return int(metrics["tokens_seen"] / float(params["derived.global_batch_tokens"]))
    return int(params["step"]) if params.get("step", "").isdigit() else None


def final_losses(run: Run) -> tuple[float, float]:
    """(train, val) latest values. An eval run logs its whole-split loss as
    eval/<split>/loss (evaluate.log_eval_run): that is its train or val loss."""
    prefix = "eval/" if run.data.tags.get(tracking.RUN_KIND_TAG) == "eval" else ""
    metrics = run.data.metrics
    return metrics.get(f"{prefix}train/loss", math.nan), metrics.get(f"{prefix}val/loss", math.nan)


def local_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def duration_text(ms: int) -> str:
    s = round(ms / 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def run_row(run: Run) -> dict:
    info, params = run.info, run.data.params
    n_layer, n_head, n_embd = shape_of(params)
    train_loss, val_loss = final_losses(run)
    finished = info.end_time and info.status != "RUNNING"
    return {
        "name": info.run_name,
        "kind": run.data.tags.get(tracking.RUN_KIND_TAG, ""),
        "status": info.status,
        "start": local_time(info.start_time) if info.start_time else None,
        "duration": duration_text(info.end_time - info.start_time) if finished else None,  # '-' while running
        "dataset": dataset_of(run),
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "params": int(float(params["derived.num_params"])) if "derived.num_params" in params else None,
        "steps": steps_of(run),
        "train loss": train_loss,
        "val loss": val_loss,
        "tokens/s": run.data.metrics.get("tokens_per_s", math.nan),
    }


def search_runs(cfg: Config, experiment: str | None = None) -> list[Run]:
    """The experiment's runs, newest first."""
    uri = tracking.tracking_uri(cfg.tracking)
    tracking.check_reachable(uri)
    client = tracking.mlflow_client(uri)
    name = experiment or cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is None:
        raise RunsError(f"no MLflow experiment named {name!r} at {redact_uri(uri)}")
    return client.search_runs([found.experiment_id], max_results=1000)


def sort_keys(runs: list[Run], rows: list[dict], metric: str | None) -> list[float]:
    """Each row's value to sort by: `metric`'s latest value, or by default
    the val loss column. A metric no run logged is an error, not a no-op."""
    if metric is None:
        return [row["val loss"] for row in rows]
    logged = sorted({key for run in runs for key in run.data.metrics})
    if metric not in logged:
        raise RunsError(f"--sort {metric}: no listed run logged this metric; "
                        f"metrics logged: {', '.join(logged) or 'none'}")
    return [run.data.metrics.get(metric, math.nan) for run in runs]


def run_rows(cfg: Config, experiment: str | None = None, sort_by: str | None = None) -> list[dict]:
    """One row per run, ascending by `sort_by`; runs without it last."""
    runs = search_runs(cfg, experiment)
    rows = [run_row(run) for run in runs]
    if not rows:
        return rows
    keys = sort_keys(runs, rows, sort_by)
    order = sorted(range(len(rows)), key=lambda i: (math.isnan(keys[i]), 0.0 if math.isnan(keys[i]) else keys[i]))
    return [rows[i] for i in order]


def cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "params":
        return f"{value / 1e6:.2f}M" if value >= 100_000 else str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    table = [COLUMNS] + [[cell(c, r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_runs(cfg: Config, experiment: str | None = None, sort_by: str | None = None) -> int:
    """`gptdist runs`."""
    rows = run_rows(cfg, experiment, sort_by)
    print(format_table(rows) if rows else "no runs yet")
    return 0
