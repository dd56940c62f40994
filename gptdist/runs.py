"""`gptdist runs`: a table of runs straight from MLflow, to compare them in
the terminal the way the MLflow UI compares them in a browser."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from gptdist import tracking
from gptdist.config import Config

COLUMNS = ["name", "kind", "status", "n_layer", "n_head", "n_embd", "params", "steps", "best val loss", "tokens/s"]


def best_of(client: MlflowClient, run_id: str, key: str) -> float:
    history = client.get_metric_history(run_id, key)
    return min((m.value for m in history), default=math.nan)


def shape_of(params: dict[str, str]) -> tuple[str, str, str]:
    from gptdist.model import PRESETS

    preset = PRESETS.get(params.get("model.preset", ""), {})
    return tuple(
        params.get(f"model.{k}") if params.get(f"model.{k}") not in (None, "None") else str(preset.get(k, "?"))
        for k in ("n_layer", "n_head", "n_embd")
    )


def run_rows(cfg: Config, experiment: str | None = None, sort_by: str = "val/loss") -> list[dict]:
    uri = tracking.tracking_uri(cfg.tracking)
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    name = experiment or cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is None:
        raise ValueError(f"no MLflow experiment named {name!r} at {uri}")
    rows = []
    for run in client.search_runs([found.experiment_id], max_results=1000):
        params, metrics = run.data.params, run.data.metrics
        n_layer, n_head, n_embd = shape_of(params)
        rows.append({
            "name": run.info.run_name,
            "kind": run.data.tags.get(tracking.RUN_KIND_TAG, ""),
            "status": run.info.status,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
            "params": int(float(params.get("derived.num_params", "nan"))) if "derived.num_params" in params else None,
            "steps": int(metrics["tokens_seen"] / float(params["derived.global_batch_tokens"]))
            if "tokens_seen" in metrics and "derived.global_batch_tokens" in params else None,
            "best val loss": best_of(client, run.info.run_id, "val/loss") if "val/loss" in metrics else math.nan,
            "tokens/s": metrics.get("tokens_per_s", math.nan),
            "_sort": best_of(client, run.info.run_id, sort_by) if sort_by in metrics else math.inf,
        })
    rows.sort(key=lambda r: (math.isnan(r["_sort"]), r["_sort"]))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"
        if isinstance(v, int):
            return f"{v / 1e6:.2f}M" if v >= 100_000 else str(v)
        return str(v)

    table = [COLUMNS] + [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def runs_main(args) -> int:
    from gptdist.config import load_config

    cfg = load_config(args.config, args.overrides)
    rows = run_rows(cfg, args.experiment, args.sort)
    print(format_table(rows) if rows else "no runs yet")
    return 0
