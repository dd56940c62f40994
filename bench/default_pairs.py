"""`python -m bench.default_pairs [--preset mini] [--pairs 3]`: gptdist's
default run against the plain fp32 loop, in alternating pairs.

`make bench` compares the two in two short pairs; a shared VM's speed moves
by a fifth within minutes, so one pair can read well above or below the
other. This runs more and longer pairs, one right after the other: the
plain loop (10 steps after 2 of warm-up, in a fresh process), then
`gptdist train` with every setting at its default (14 steps; the median of
its windows after the first two), on one local Ray.

Writes bench/results/<date>-<host>-<cpu kind>-<preset>-pairs.json and prints each pair."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench import train_speed
from bench.__main__ import machine_record, result_path

PLAIN_STEPS, PLAIN_WARMUP, GPTDIST_STEPS = 10, 2, 14


def one_pair(preset_name: str, data_path: str) -> dict:
    plain = train_speed.plain_loop_in_child(preset_name, PLAIN_STEPS, PLAIN_WARMUP)
    run = train_speed.gptdist_run(preset_name, GPTDIST_STEPS, data_path)
    return {"at": datetime.now().isoformat(timespec="seconds"), "plain_tokens_per_s": plain["tokens_per_s"],
            "gptdist_tokens_per_s": run["tokens_per_s"], "gptdist_mfu": run["mfu_reported"],
            "ratio": run["tokens_per_s"] / plain["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.default_pairs")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()

    from gptdist.ray_session import shutdown_ray, start_local_ray

    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=False)
    pairs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = train_speed.ensure_shakespeare(Path(tmp))
            for _ in range(args.pairs):
                pairs.append(one_pair(args.preset, data))
                p = pairs[-1]
                print(f"{p['at']}: plain {p['plain_tokens_per_s']:,.0f} tok/s, gptdist "
                      f"{p['gptdist_tokens_per_s']:,.0f} tok/s: {p['ratio']:.2f}x", flush=True)
    finally:
        shutdown_ray()
    report = {**machine_record(), "cores": os.cpu_count(),
              "what": f"{args.preset}, batch {train_speed.BATCH} x {train_speed.BLOCK}: the plain fp32 loop "
                      f"({PLAIN_STEPS} steps after {PLAIN_WARMUP}) and gptdist train with default settings "
                      f"({GPTDIST_STEPS} steps, median of the windows after the first two) in alternating pairs",
              "pairs": pairs, "mean_ratio": statistics.mean(p["ratio"] for p in pairs)}
    out = result_path(f"-{args.preset}-pairs")
    out.write_text(json.dumps(report, indent=2))
    print(f"mean of the pairs' ratios: {report['mean_ratio']:.2f}x\nwritten {out}")


if __name__ == "__main__":
    main()
