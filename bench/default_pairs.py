"""`python -m bench.default_pairs [--preset mini] [--pairs 3] [--set KEY=VALUE ...]`:
gptdist's default run against the plain fp32 loop, in alternating pairs.

`make bench` compares the two in two short pairs; a shared VM's speed moves
by a fifth within minutes, so one pair can read well above or below the
other. This runs more and longer pairs, one right after the other: the
plain loop (10 steps after 2 of warm-up, in a fresh process), then
`gptdist train` with every setting at its default (14 steps; the median of
its windows after the first two), on one local Ray. `--set` changes a
setting of the gptdist run, as `gptdist train --set` does: with
`--set train.precision=fp32` a CPU whose probe chooses bf16 shows what the
fp32 path would give where fp32 is the faster precision.

Writes bench/results/<date>-<host>-<cpu kind>-<preset>-pairs.json (with
`--set`, `-<preset>-<settings>-pairs.json`) and prints each pair."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench import train_speed
from bench.__main__ import machine_record, result_path
from gptdist.config import ConfigError, load_config

PLAIN_STEPS, PLAIN_WARMUP, GPTDIST_STEPS = 10, 2, 14


def settings_suffix(overrides: list[str]) -> str:
    """`-precision-fp32` for `train.precision=fp32`: the result file's name
    says which settings the gptdist runs changed."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, _, value in (o.partition("=") for o in overrides)]
    return "".join(f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', p)}" for p in parts)


def one_pair(preset_name: str, data_path: str, overrides: list[str]) -> dict:
    plain = train_speed.plain_loop_in_child(preset_name, PLAIN_STEPS, PLAIN_WARMUP)
    run = train_speed.gptdist_run(preset_name, GPTDIST_STEPS, data_path, *overrides)
    return {"at": datetime.now().isoformat(timespec="seconds"), "plain_tokens_per_s": plain["tokens_per_s"],
            "gptdist_tokens_per_s": run["tokens_per_s"], "gptdist_mfu": run["mfu_reported"],
            "gptdist_precision": run["precision"], "gptdist_attention": run["attention"],
            "ratio": run["tokens_per_s"] / plain["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.default_pairs")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the gptdist run (repeatable), e.g. train.precision=fp32")
    args = parser.parse_args()
    try:
        load_config(overrides=args.overrides)  # a bad setting fails here, before Ray starts
    except ConfigError as e:
        parser.error(str(e))

    from gptdist.ray_session import shutdown_ray, start_local_ray

    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=False)
    pairs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = train_speed.ensure_shakespeare(Path(tmp))
            for _ in range(args.pairs):
                pairs.append(one_pair(args.preset, data, args.overrides))
                p = pairs[-1]
                print(f"{p['at']}: plain {p['plain_tokens_per_s']:,.0f} tok/s, gptdist "
                      f"{p['gptdist_tokens_per_s']:,.0f} tok/s ({p['gptdist_precision']}, {p['gptdist_attention']} "
                      f"attention): {p['ratio']:.2f}x", flush=True)
    finally:
        shutdown_ray()
    settings = ", ".join(args.overrides) or "default settings"
    report = {**machine_record(), "cores": os.cpu_count(),
              "what": f"{args.preset}, batch {train_speed.BATCH} x {train_speed.BLOCK}: the plain fp32 loop "
                      f"({PLAIN_STEPS} steps after {PLAIN_WARMUP}) and gptdist train with {settings} "
                      f"({GPTDIST_STEPS} steps, median of the windows after the first two) in alternating pairs",
              "overrides": args.overrides,
              "pairs": pairs, "mean_ratio": statistics.mean(p["ratio"] for p in pairs)}
    out = result_path(f"-{args.preset}{settings_suffix(args.overrides)}-pairs")
    out.write_text(json.dumps(report, indent=2))
    print(f"mean of the pairs' ratios: {report['mean_ratio']:.2f}x\nwritten {out}")


if __name__ == "__main__":
    main()
