"""`python -m bench [--quick]`: speed, efficiency and memory of gptdist on
this machine, each against a baseline measured in the same run, and the
wall time of the short commands (bench.small_commands) against their limits.

Writes bench/results/<date>-<host>.json and prints a Markdown table.
Targets are reported, never asserted."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from bench import bench_data, small_commands, train_speed
from gptdist.attention_probe import AttentionShape, probe_attention
from gptdist.metrics import measure_cpu_peak_flops
from gptdist.model import preset
from gptdist.precision_probe import BF16_MARGIN, isa_caps, model_matmuls
from gptdist.ray_session import shutdown_ray, start_local_ray

RESULTS = Path(__file__).resolve().parent / "results"


def row(name, value, baseline=None, target=None, unit="", note="", at_most=None):
    """`target` is a ratio to reach (value / baseline); `at_most` a limit on
    the value itself (the seconds a command may take). A missing value
    (the command failed) misses its limit."""
    ratio = value / baseline if (baseline and value is not None) else None
    if at_most is not None:
        met = value is not None and value <= at_most
    else:
        met = None if target is None or ratio is None else ratio >= target
    return {"name": name, "value": value, "baseline": baseline, "ratio": ratio, "target": target,
            "at_most": at_most, "met": met, "unit": unit, "note": note}


# The candidates for the best CPU setting, (c) in the table: {key: (label, overrides)}.
# bf16 autocast only where `precision: auto` would choose it (the precision
# probe on mini's matmuls); elsewhere bf16 is slower than fp32 (emulated
# without bf16 instructions, over 100x slower; 0.6x on one AVX-512 BF16 CPU)
# and the candidates are fp32 with torch.compile.
BF16_SETTINGS = {
    "bf16": ("bf16", ["train.precision=bf16"]),
    "bf16_compile": ("bf16+compile", ["train.precision=bf16", "train.compile=true"]),
    # Inductor fuses the plain head + cross-entropy itself; measured both
    # ways, since either may win on a given CPU.
    "bf16_compile_plain_loss": ("bf16+compile, plain loss",
                                ["train.precision=bf16", "train.compile=true", "train.chunked_loss=false"]),
}
FP32_SETTINGS = {
    "fp32_compile": ("fp32+compile", ["train.precision=fp32", "train.compile=true"]),
    "fp32_compile_plain_loss": ("fp32+compile, plain loss",
                                ["train.precision=fp32", "train.compile=true", "train.chunked_loss=false"]),
}


def best_setting_candidates(fast_bf16: bool, quick: bool, preset_name: str) -> dict[str, tuple[str, list[str]]]:
    """Quick mode (under 10 minutes on a 2-core CPU) measures all but the
    plain-loss compile on `mini`, and on `micro` bf16 where the probe chose it
    (no compile there: it alone took 80 s of a quick run)."""
    settings = BF16_SETTINGS if fast_bf16 else FP32_SETTINGS
    keys = list(settings)
    if quick:
        keys = keys[:-1] if preset_name == "mini" else (["bf16"] if fast_bf16 else [])
    return {k: settings[k] for k in keys}


def setting_precision(key: str) -> str:
    return "bf16" if key.startswith("bf16") else "fp32"


def timed_steps(quick: bool, preset_name: str) -> int:
    """Steps timed per run after the warm-up. `micro` steps take under a
    second, so quick mode times ten of them: three windows were too few to
    leave the first steps' slower start behind."""
    if not quick:
        return 12
    return 10 if preset_name == "micro" else 3


def measure_training(quick: bool, tmp: Path) -> tuple[list[dict], dict]:
    threads = os.cpu_count() or 1
    # What `train.precision: auto` would choose for a 1-worker mini run (the
    # chunked loss, as on CPU workers), measured afresh (not from the cache)
    # in a process started as a worker is, where the workers measure it. On a
    # Zen-5 EPYC fp32 read 113 GFLOP/s in the bench's own process, 163-167 in
    # a fresh one on glibc's malloc defaults and 182-194 in such a process.
    matmuls = model_matmuls(preset("mini", block_size=train_speed.BLOCK), train_speed.BATCH, chunked_loss=True)
    probe = train_speed.in_child(train_speed.probe_precision_on_threads, matmuls, threads, worker_malloc=True)
    print(probe.summary(), flush=True)
    fast_bf16 = probe.precision == "bf16"
    peaks = train_speed.matmul_peaks(threads, fast_bf16)
    bf16_note = "" if fast_bf16 else "bf16 not faster on mini's matmuls (probe): no bf16 runs below"
    rows = [row("matmul peak fp32 (2048^2, the MFU denominator)", peaks["fp32"] / 1e9, unit="GFLOP/s"),
            row("matmul peak bf16 (2048^2, the MFU denominator)", peaks["bf16"] / 1e9, unit="GFLOP/s",
                note=bf16_note),
            row("matmul fp32, mini's QKV shape (4096x384 . 384x1152)", peaks["fp32_qkv_shape"] / 1e9,
                peaks["fp32"] / 1e9, unit="GFLOP/s"),
            row(f"matmul peak fp32, {threads} threads vs 1 thread", peaks["fp32"] / 1e9,
                peaks["fp32_1thread"] / 1e9, unit="GFLOP/s", note="how the cores add up on this machine")]
    rows += [row("precision probe: mini's matmuls fp32 (forward)", probe.fp32_flops / 1e9, unit="GFLOP/s"),
             row("precision probe: mini's matmuls bf16 autocast (forward)", probe.bf16_flops / 1e9,
                 probe.fp32_flops / 1e9, unit="GFLOP/s",
                 note=f"precision auto chooses {probe.precision} (bf16 needs >= {BF16_MARGIN}x)")]
    if fast_bf16:
        rows.append(row("matmul bf16, mini's QKV shape (4096x384 . 384x1152)", peaks["bf16_qkv_shape"] / 1e9,
                        peaks["bf16"] / 1e9, unit="GFLOP/s"))
    # What `train.attention: auto` would choose for that run, in the precision chosen above, measured
    # afresh in a process started as a worker is.
    mini = preset("mini", block_size=train_speed.BLOCK)
    shape = AttentionShape(train_speed.BATCH, mini.n_head, train_speed.BLOCK, mini.n_embd // mini.n_head,
                           probe.precision)
    attention = train_speed.in_child(probe_attention, shape, None, worker_malloc=True)
    print(attention.summary(), flush=True)
    layer = f"attention probe: one mini layer fwd+bwd, {probe.precision}"
    rows += [row(f"{layer}, SDPA", attention.sdpa_s * 1e3, unit="ms"),
             row(f"{layer}, matmuls", attention.matmul_s * 1e3,
                 attention.sdpa_s * 1e3, unit="ms",
                 note=f"attention auto chooses {attention.attention} ({attention.rule()})")]
    raw: dict = {"peaks": peaks, "fast_bf16": fast_bf16, "precision_probe": asdict(probe),
                 "attention_probe": asdict(attention)}
    data = train_speed.ensure_shakespeare(tmp)
    for name in ["micro", "mini"]:
        steps = timed_steps(quick, name)
        candidates = best_setting_candidates(fast_bf16, quick, name)
        plain = train_speed.plain_loop_in_child(name, steps, 2)
        # The same loop with glibc keeping freed memory, as gptdist's workers
        # start: how much of gptdist's gain is that setting alone.
        plain_kept = train_speed.plain_loop_in_child(name, steps, 2, worker_malloc=True)
        plain_bf16 = (train_speed.plain_loop_in_child(name, steps, 2, precision="bf16")
                      if fast_bf16 and (not quick or name == "mini") else None)
        fpt = plain["flops_per_token"]
        mfu = lambda tps, peak: tps * fpt / peak
        runs: dict[str, dict] = {}
        # Ray as `gptdist train --local` starts it, with the dashboard whose
        # state API Ray Train's placement-group cleaner polls.
        start_local_ray(threads + 1)
        try:
            runs["fp32"] = train_speed.gptdist_run(name, steps + 3, data, "train.precision=fp32")
            if name == "mini":  # the data path: Ray Data (the default) against each worker reading shards itself
                runs["direct"] = train_speed.gptdist_run(name, steps + 3, data, "train.precision=fp32",
                                                         "data.ingest=direct")
            for key, (_, overrides) in candidates.items():
                extra = 3 if "train.compile=true" in overrides else 0  # compile's own warm-up steps
                runs[key] = train_speed.gptdist_run(name, steps + 3 + extra, data, *overrides)
            # (d) on `micro` in quick mode: its steps are short, so gloo's
            # all-reduce weighs more there than on `mini`.
            if not quick or name == "micro":
                runs["2x1"] = train_speed.gptdist_run(name, steps + 3, data, "ray.num_workers=2", "train.cpu_threads=1",
                                                      "train.micro_batch_size=4", "train.precision=fp32")
            if name == "mini":  # the default run again, paired with the plain loop right after it
                default_key = "bf16" if fast_bf16 and "bf16" in candidates else "fp32"
                runs[f"{default_key}_again"] = train_speed.gptdist_run(name, steps + 3, data,
                                                                       f"train.precision={default_key}")
        finally:
            shutdown_ray()
        # The baseline again after the gptdist runs: on a shared VM the same
        # loop read 326 and 413 tok/s ten minutes apart, so one reading
        # minutes before the runs it is compared with moves the ratio more
        # than most changes to the step. The baseline is the mean of both.
        plain_after = train_speed.plain_loop_in_child(name, steps, 2)
        turns = train_speed.alternating_steps(name, rounds=4 if quick else 8)
        fp32 = runs["fp32"]
        before, after = plain["tokens_per_s"], plain_after["tokens_per_s"]
        base = (before + after) / 2
        rows += [
            row(f"{name}: plain PyTorch loop fp32 (baseline)", base, unit="tok/s",
                note=f"MFU {mfu(base, peaks['fp32']):.0%} of fp32 peak; mean of {before:,.0f} before and "
                     f"{after:,.0f} after the gptdist runs"),
        ]
        rows.append(row(f"{name}: plain PyTorch loop fp32 with the workers' malloc settings",
                        plain_kept["tokens_per_s"], before, unit="tok/s",
                        note="baseline: the plain loop just before it; glibc keeps freed memory, so the step's "
                             "full-logits temporaries are not faulted in afresh each step"))
        if plain_bf16:
            rows.append(row(f"{name}: plain PyTorch loop bf16 autocast", plain_bf16["tokens_per_s"], base, unit="tok/s"))
        rows += [
            # The default on CPUs where fp32 is the faster precision: 1.3x there.
            row(f"{name}: gptdist train 1 worker fp32", fp32["tokens_per_s"], base,
                speed_target("fp32", probe.precision), "tok/s",
                f"MFU {mfu(fp32['tokens_per_s'], peaks['fp32']):.0%} of fp32 peak (target 75%); the default "
                "where fp32 is faster, target 1.3x there"),
        ]
        if candidates:
            best_key = max(candidates, key=lambda k: runs[k]["tokens_per_s"])
            best, best_name, best_precision = runs[best_key], candidates[best_key][0], setting_precision(best_key)
            rows.append(row(
                f"{name}: gptdist train 1 worker {best_name}", best["tokens_per_s"], base,
                speed_target(best_precision, probe.precision), "tok/s",
                f"best of {', '.join(label for label, _ in candidates.values())}; MFU "
                f"{mfu(best['tokens_per_s'], peaks[best_precision]):.0%} of {best_precision} peak "
                f"(target {'65%' if best_precision == 'bf16' else '75%'})"))
        # The default run (precision auto, no compile) is the bf16 run where the
        # probe chose bf16, else the fp32 run: the same settings.
        default_key = "bf16" if fast_bf16 and "bf16" in runs else "fp32"
        default = runs[default_key]
        target = speed_target(probe.precision, probe.precision)
        if f"{default_key}_again" in runs:
            pairs = [(plain, default), (plain_after, runs[f"{default_key}_again"])]
            rows.append(paired_row(name, probe.precision, pairs, target))
        else:
            rows.append(row(
                f"{name}: gptdist train default settings (precision auto: {probe.precision}) vs plain fp32 loop",
                default["tokens_per_s"], base, target, "tok/s",
                "target 2.0x where bf16 is the faster precision, 1.3x where fp32 is"))
        rows.append(turns_row(name, turns))
        if "direct" in runs:
            rows.append(row(f"{name}: Ray Data ingest vs direct shard reads, gptdist fp32", fp32["tokens_per_s"],
                            runs["direct"]["tokens_per_s"], 0.98, "tok/s",
                            "baseline: data.ingest=direct, the same run otherwise"))
        if "2x1" in runs:
            rows.append(row(f"{name}: 2 workers x 1 thread vs 1 worker x 2 threads", runs["2x1"]["tokens_per_s"],
                            fp32["tokens_per_s"], unit="tok/s"))
        rows += [
            row(f"{name}: time to first step, gptdist train (Ray running)", fp32["time_to_first_step_s"], unit="s"),
            row(f"{name}: peak RSS, gptdist train worker fp32", fp32["worker_peak_rss_mb"], plain["peak_rss_mb"],
                unit="MB", note="baseline: the plain loop's process"),
            row(f"{name}: peak RSS, gptdist train driver", fp32["driver_peak_rss_mb"], unit="MB",
                note="the bench process: it also started Ray and prepared the data"),
        ]
        raw[name] = {"plain_fp32": plain, "plain_fp32_after": plain_after, "plain_fp32_worker_malloc": plain_kept,
                     "plain_bf16": plain_bf16, "turns": turns,
                     **{f"gptdist_{k}": v for k, v in runs.items()}}
    # The peak again after the training runs: if the machine itself sped up
    # or slowed down meanwhile, the ratios above compare unlike moments.
    torch.set_num_threads(threads)
    peaks["fp32_end"] = measure_cpu_peak_flops("fp32", size=2048, seconds=0.5, trials=10)
    rows.append(row("matmul peak fp32 after the training runs vs before", peaks["fp32_end"] / 1e9,
                    peaks["fp32"] / 1e9, unit="GFLOP/s", note="the machine's own speed over the run"))
    return rows, raw


def speed_target(precision: str, chosen: str) -> float | None:
    """The ratio to the plain fp32 loop that a run in `precision` is held to
    on a CPU whose precision probe chose `chosen`: 2.0x for bf16, 1.3x for
    fp32 where fp32 is the faster precision. An fp32 run where bf16 is the
    faster is not the default and has no target (it is shown for what the
    fp32 path gives)."""
    if precision == "bf16":
        return 2.0
    return 1.3 if chosen == "fp32" else None


def paired_row(name: str, precision: str, pairs: list[tuple[dict, dict]], target: float) -> dict:
    """The default run against the plain loop as the mean of per-pair ratios,
    each pair measured minutes apart at most (the plain loop just before the
    first default run, just after the second). One baseline for runs ten
    minutes apart misled: this VM's speed moved 2x within an hour, and the
    full bench once read 0.89x where separate pairs that hour read 1.4-1.5x."""
    ratios = [run["tokens_per_s"] / plain["tokens_per_s"] for plain, run in pairs]
    value = sum(run["tokens_per_s"] for _, run in pairs) / len(pairs)
    ratio = sum(ratios) / len(ratios)
    readings = "; ".join(f"{run['tokens_per_s']:,.0f} vs {plain['tokens_per_s']:,.0f}" for plain, run in pairs)
    result = row(f"{name}: gptdist train default settings (precision auto: {precision}) vs plain fp32 loop, "
                 f"{len(pairs)} pairs", value, value / ratio, target, "tok/s",
                 f"mean of the pairs' ratios ({', '.join(f'{r:.2f}x' for r in ratios)}: {readings} tok/s); "
                 "target 2.0x where bf16 is the faster precision, 1.3x where fp32 is")
    if min(ratios) < target <= max(ratios):
        # The pairs disagree about the verdict: the run shows neither.
        result["met"] = UNSETTLED
        result["note"] += "; one pair meets the target and one misses it"
    return result


UNSETTLED = "unsettled"


def turns_row(name: str, turns: dict) -> dict:
    """gptdist's fp32 step against the plain loop's, both with the workers'
    malloc settings, taking turns step by step without Ray
    (`train_speed.alternating_steps`): the step code's own gain, which a
    drifting machine moves far less than whole runs minutes apart."""
    ratios = turns["ratios"]
    value = turns["gptdist_tokens_per_s"]
    return row(f"{name}: gptdist's fp32 step vs the plain loop's, both with the workers' malloc settings, "
               "taking turns step by step, no Ray", value,
               value / turns["ratio"], unit="tok/s",
               note=f"median of {len(ratios)} rounds' ratios ({min(ratios):.2f}-{max(ratios):.2f}x); plain step "
                    f"{turns['plain_tokens_per_s']:,.0f} tok/s; what Ray adds: python -m bench.ray_cost")


def measure_first_step_cold(tmp: Path) -> dict:
    """Ray start + worker start + data ready: `gptdist train --local` from cold."""
    import subprocess
    import sys

    data = tmp / "shakespeare-512"
    out = subprocess.run(
        [sys.executable, "-m", "gptdist.cli", "train", "--local", "--set", "model.preset=micro",
         "--set", f"data.path={data}", "--set", "train.max_steps=1", "--set", "train.sample_tokens=0",
         "--set", f"ray.storage_path={tmp}/ray-cold", "--set", f"tracking.uri=sqlite:///{tmp}/cold.db",
         "--set", f"tracking.runs_dir={tmp}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/cold.db")
    exp = client.get_experiment_by_name("gptdist")
    run = client.search_runs([exp.experiment_id])[0]
    return {"time_to_first_step_s": run.data.metrics.get("time_to_first_step_s"), "rc": out.returncode}


def markdown(rows: list[dict]) -> str:
    def fmt(v) -> str:
        return "-" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v))

    lines = ["| measurement | value | baseline | ratio | target | met | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = "-" if r["target"] is None else f">= {r['target']}x"
        if r.get("at_most") is not None:
            target = f"<= {r['at_most']} {r['unit']}"
        met = {None: "-", True: "yes", False: "NO"}.get(r["met"], r["met"])
        lines.append(f"| {r['name']} | {fmt(r['value'])} {r['unit']} | {fmt(r['baseline'])} | {ratio} | "
                     f"{target} | {met} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="the under-10-minute subset")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, raw = measure_training(args.quick, tmp)
        cold = measure_first_step_cold(tmp)
        rows.append(row("time to first step, gptdist train --local from cold", cold["time_to_first_step_s"], unit="s",
                        note="Ray start + worker start + data ready"))
        commands = small_commands.run(data_path=str(tmp / "shakespeare-512"))
        raw["small_commands"] = commands
        rows += small_command_rows(commands)
        data = bench_data.run(args.quick)
        raw["data"] = data
    fastest = max(v["tokens_per_s"] for k, v in raw["mini"].items() if k.startswith("gptdist") and v)
    rows += data_rows(data, fastest)
    gpu = sorted(RESULTS.glob("*h100*.json"))
    report = {**machine_record(), "quick": args.quick, "cpus": os.cpu_count(),
              "seconds": time.time() - started,
              "rows": rows, "raw": raw, "gpu_results": [p.name for p in gpu]}
    out = result_path()
    out.write_text(json.dumps(report, indent=2, default=str))
    print(markdown(rows))
    print(f"\nwritten {out} in {report['seconds']:.0f} s")


def machine_record() -> dict:
    """The head of every result file: when, where and on what CPU."""
    record = {"date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "cpu": cpu_description(), "cpu_identity": cpu_identity()}
    return {**record, "isa_caps": caps} if (caps := isa_caps()) else record


def result_path(suffix: str = "") -> Path:
    """bench/results/<date>-<host>-<cpu kind><caps><suffix>.json, not yet
    taken. Named by CPU kind too: two VMs of one host name had different
    CPUs; and by the instruction-set caps in force, if any."""
    RESULTS.mkdir(exist_ok=True)
    kind = f"{cpu_kind()}{isa_caps_suffix(isa_caps())}"
    return unused_path(RESULTS / f"{datetime.now():%Y-%m-%d}-{platform.node()}-{kind}{suffix}.json")


def isa_caps_suffix(caps: dict[str, str]) -> str:
    """`-onednn-avx512_core_bf16` for ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: a
    run with oneDNN kept off AMX stands in for an Intel CPU without it."""
    short = {"ONEDNN_MAX_CPU_ISA": "onednn", "DNNL_MAX_CPU_ISA": "onednn", "MKL_ENABLE_INSTRUCTIONS": "mkl",
             "ATEN_CPU_CAPABILITY": "aten"}
    return "".join(f"-{short.get(name, name.lower())}-{re.sub(r'[^a-z0-9_]+', '_', value.lower())}"
                   for name, value in caps.items())


def unused_path(path: Path) -> Path:
    """`path`, or with -2, -3, ... before the suffix if it exists: a second
    run on the same day and CPU kind keeps the first one's file."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The vendor and the matmul instructions, for file names: intel-amx,
    amd-avx512bf16, intel-avx512bf16, ...-avx512, ...-avx2. The vendor is
    part of it because one instruction set runs at different speeds on the
    two: bf16 matmuls ran at 2.1x fp32 on an AMD EPYC with AVX-512 BF16 and
    at 0.54x on an Intel Xeon with the same flag and no AMX."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    fields = first_cpu_fields(cpuinfo)
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(fields.get("vendor_id", ""))
    flags = set(fields.get("flags", "").split())
    kind = next((kind for flag, kind in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"),
                                         ("avx2", "avx2")) if flag in flags), "other")
    return f"{vendor}-{kind}" if vendor else kind


def cpu_description() -> str:
    """Model name and the matmul-relevant flags: hosts of the same name differ
    (one VM read 388 / 2,327 GFLOP/s fp32 / bf16 with AMX, another 182 / 410)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in info]
    return f"{name} ({', '.join(flags)})" if flags else name


def first_cpu_fields(cpuinfo: str) -> dict[str, str]:
    """The fields of /proc/cpuinfo's first processor."""
    first = cpuinfo.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu_identity(cpuinfo: str | None = None, cache_root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict:
    """Vendor, family, model, stepping and cache sizes: a hypervisor's CPU
    model name ("AMD EPYC") hides which processor runs the VM, and one VM of
    that name ran fp32 matmuls at 177 GFLOP/s one morning and 41-70 later
    (16 FLOP per cycle per core, half the first host's rate)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = first_cpu_fields(cpuinfo)
    wanted = {"vendor": "vendor_id", "family": "cpu family", "model": "model", "stepping": "stepping",
              "model_name": "model name", "mhz": "cpu MHz", "bogomips": "bogomips"}
    identity = {key: fields.get(name) for key, name in wanted.items()}
    identity["hypervisor"] = "hypervisor" in fields.get("flags", "").split()
    for index in sorted(cache_root.glob("index*")) if cache_root.exists() else []:
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            identity[f"L{level}_{kind.lower()}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return identity


def small_command_rows(figures: dict) -> list[dict]:
    """One row per command of bench.small_commands: its wall time (median of
    its runs) against its limit."""
    rows = []
    for name, (limit, label) in small_commands.TARGETS.items():
        figure = figures[name]
        if figure["seconds"] is None:
            note = f"failed: exit code {figure['rc']}"
        elif "all_seconds" in figure:
            runs = figure["all_seconds"]
            note = f"median of {len(runs)} runs ({min(runs):.2f}-{max(runs):.2f} s)"
        else:
            note = f"process start to the first progress line; the run ended after {figure['until_exit_s']:.0f} s"
        rows.append(row(f"small commands: {label}", figure["seconds"], unit="s", note=note, at_most=limit))
    return rows


def data_rows(data: dict, consumption: float) -> list[dict]:
    """Rows from bench_data's figures; the ingest baseline is the fastest
    `mini` training run measured above (what one worker consumes)."""
    return [
        row("data: prepare throughput (Ray Data)", float(data["prepare_tokens_per_s"]),
            float(data["baseline_tokens_per_s"]), 1.6, "tok/s",
            f"baseline: nanoGPT prepare.py, one process; {data['corpus_tokens']:,} tokens"),
        row("data: per-worker ingest (the training iterator, Ray Data) vs mini consumption",
            float(data["ingest_tokens_per_s"]), consumption, 20.0, "tok/s",
            f"rank 0 of {data['ingest_world_size']}; baseline: the fastest mini run above"),
    ]


if __name__ == "__main__":
    main()
