"""`python -m bench.ray_cost [--preset mini] [--precision fp32] [--rounds 2]`:
what running the training step under Ray costs on this machine.

The same step (`gptdist.train_step.optimizer_step`, chunked loss, fused
AdamW, synthetic tokens, one process on all cores, the workers' malloc
settings) is timed three ways, in turn, `rounds` times:
- in a process of its own, no Ray;
- in a plain Ray actor on a local Ray;
- in the worker of a one-worker Ray Train run (`TorchTrainer`) on that Ray.
Each case also records the step's page faults (memory the process's malloc
handed back to the kernel and took again) and how many cores everything
else on the machine used while the steps ran: on a 2-core machine a step
whose two threads wait on each other loses more than that share when
either thread is descheduled.

Writes bench/results/<date>-<host>-<cpu kind>-ray-cost.json and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.__main__ import machine_record, result_path
from bench.cpu_profile import worker_step
from bench.train_speed import BATCH, BLOCK
from gptdist.config import load_config
from gptdist.driver import CONTROLLER_POLL_ENV, WORKER_MALLOC_ENV
from gptdist.metrics_window import page_faults

WARMUP = 2


def machine_busy_s() -> float | None:
    """CPU seconds all processes have run (user, nice, system, irq, softirq,
    steal), from /proc/stat; None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_steps(preset_name: str, precision: str, steps: int) -> dict:
    """`steps` optimizer steps after a warm-up, in the calling process."""
    torch.set_num_threads(os.cpu_count() or 1)
    _, step = worker_step(preset_name, precision, WARMUP + steps)
    for i in range(WARMUP):
        step(i)
    busy, own, wall, faults = machine_busy_s(), time.process_time(), time.perf_counter(), page_faults()
    times = []
    for i in range(WARMUP, WARMUP + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    wall, own, faults = time.perf_counter() - wall, time.process_time() - own, page_faults() - faults
    others = None if busy is None else (machine_busy_s() - busy - own) / wall
    step_s = statistics.median(times)
    return {"step_s": step_s, "tokens_per_s": BATCH * BLOCK / step_s, "step_times_s": times,
            "threads": torch.get_num_threads(), "process_cores": own / wall, "others_cores": others,
            "page_faults_per_step": faults / steps}


def in_own_process(preset_name: str, precision: str, steps: int) -> dict:
    """`timed_steps` in a fresh interpreter: glibc reads the malloc settings
    only when a process starts."""
    code = (f"import json; from bench.ray_cost import timed_steps; "
            f"print(json.dumps(timed_steps({preset_name!r}, {precision!r}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **WORKER_MALLOC_ENV},
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_ray_actor(preset_name: str, precision: str, steps: int) -> dict:
    import ray

    runner = ray.remote(num_cpus=1, runtime_env={"env_vars": WORKER_MALLOC_ENV})(timed_steps)
    return ray.get(runner.remote(preset_name, precision, steps))


def in_ray_train_worker(preset_name: str, precision: str, steps: int) -> dict:
    """A one-worker TorchTrainer as gptdist starts it (controller poll interval
    and worker environment); the worker writes its figures to a file, which
    needs no report to reach the driver."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(config: dict) -> None:
        figures = timed_steps(config["preset"], config["precision"], config["steps"])
        Path(config["out"]).write_text(json.dumps(figures))

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[CONTROLLER_POLL_ENV] = str(load_config().ray.controller_poll_s)
        out = Path(tmp) / "figures.json"
        TorchTrainer(worker, train_loop_config={"preset": preset_name, "precision": precision, "steps": steps,
                                                "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=f"{tmp}/ray",
                                          worker_runtime_env={"env_vars": WORKER_MALLOC_ENV})).fit()
        return json.loads(out.read_text())


CASES = {"own process, no Ray": in_own_process, "plain Ray actor": in_ray_actor,
         "Ray Train worker": in_ray_train_worker}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_cost")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from gptdist.ray_session import shutdown_ray, start_local_ray

    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=False)
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    try:
        for _ in range(args.rounds):
            for name, case in CASES.items():
                runs[name].append(case(args.preset, args.precision, args.steps))
    finally:
        shutdown_ray()
    base = statistics.mean(r["step_s"] for r in runs["own process, no Ray"])
    summary = {name: {"step_s": [r["step_s"] for r in rs], "others_cores": [r["others_cores"] for r in rs],
                      "page_faults_per_step": [r["page_faults_per_step"] for r in rs],
                      "slowdown": statistics.mean(r["step_s"] for r in rs) / base} for name, rs in runs.items()}
    report = {**machine_record(), "cores": os.cpu_count(),
              "torch": torch.__version__,
              "worker_malloc_env": WORKER_MALLOC_ENV,
              "preset": args.preset, "precision": args.precision, "batch": [BATCH, BLOCK],
              "steps_per_case": args.steps, "rounds": args.rounds, "summary": summary, "runs": runs}
    out = result_path("-ray-cost")
    out.write_text(json.dumps(report, indent=2))
    print(f"{args.preset} {args.precision}, batch {BATCH} x {BLOCK}, {args.rounds} rounds of {args.steps} steps\n")
    print("| where the step runs | s/step (each round) | against its own process | other processes' cores "
          "| page faults a step |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        others = ", ".join("-" if c is None else f"{c:.2f}" for c in s["others_cores"])
        faults = ", ".join(f"{f:,.0f}" for f in s["page_faults_per_step"])
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in s['step_s'])} | {s['slowdown']:.2f}x | {others} | {faults} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
