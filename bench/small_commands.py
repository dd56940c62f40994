"""The commands a user waits on: wall time of the real `gptdist` CLI, each in
a fresh process, against a fixed target on a 2-core CPU.

    gptdist --help                                       1.5 s
    gptdist train --set train.max_steps=ten (an error)   1.5 s
    gptdist runs (a store of three runs)                 3 s
    gptdist sample of 40 tokens, local checkpoint        10 s
    gptdist eval of Shakespeare's val split (86 rows)    30 s
    gptdist train --local from cold to its first step    30 s

The first-step time runs from the process start to the first progress line
(`step 1/N | ...`) on its output, Ray's start included; the data set is
prepared beforehand. That run (nano, 2 steps) leaves the checkpoint that
sample and eval read; its MLflow run and eval's make the store `runs`
lists. The short commands run several times, and the median counts.
Everything lives in a temporary folder; no Ray runs in this process.
Targets are reported, never asserted.

    .venv/bin/python -m bench.small_commands
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (target in seconds, what the row says)
TARGETS = {
    "help": (1.5, "gptdist --help"),
    "config_error": (1.5, "gptdist train --set train.max_steps=ten (config error)"),
    "runs": (3.0, "gptdist runs (3 runs in a SQLite store)"),
    "sample": (10.0, "gptdist sample 40 tokens from a local checkpoint (nano)"),
    "eval": (30.0, "gptdist eval of the val split (Shakespeare, 86 rows of 512, nano)"),
    "first_step": (30.0, "gptdist train --local from cold to the first step (nano)"),
}
REPEATS = 3
# The progress line train_loop prints, after Ray's "(RayTrainWorker pid=…)" prefix.
FIRST_STEP_LINE = re.compile(r"\bstep\s+1/\d+ \|")


def gptdist_command() -> list[str]:
    """The installed console script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("gptdist")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gptdist.cli"]


def timed(args: list[str], cwd: Path, expect_rc: int = 0, expect_text: str = "") -> dict:
    """Wall time of one run of the command, from start to exit; it counts
    when it exits with `expect_rc` and its output holds `expect_text`."""
    start = time.perf_counter()
    done = subprocess.run(gptdist_command() + args, cwd=cwd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    ok = done.returncode == expect_rc and expect_text in done.stdout + done.stderr
    return {"seconds": seconds, "rc": done.returncode, "ok": ok,
            "output_tail": "" if ok else (done.stdout + done.stderr)[-2000:]}


def repeated(args: list[str], cwd: Path, repeats: int = REPEATS, expect_rc: int = 0, expect_text: str = "") -> dict:
    runs = [timed(args, cwd, expect_rc, expect_text) for _ in range(repeats)]
    ok = [r["seconds"] for r in runs if r["ok"]]
    return {"seconds": statistics.median(ok) if len(ok) == len(runs) else None,
            "all_seconds": [r["seconds"] for r in runs], "rc": [r["rc"] for r in runs],
            "output_tail": next((r["output_tail"] for r in runs if not r["ok"]), "")}


def first_step(args: list[str], cwd: Path) -> dict:
    """Seconds from the process start to its first progress line; the run
    then goes on to its end (its checkpoint is what sample and eval read)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(gptdist_command() + args, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds, tail = None, []
    for line in proc.stdout:
        if seconds is None and FIRST_STEP_LINE.search(line):
            seconds = time.perf_counter() - start
        tail = (tail + [line])[-30:]
    rc = proc.wait()
    return {"seconds": seconds if rc == 0 else None, "until_exit_s": time.perf_counter() - start, "rc": rc,
            "output_tail": "" if rc == 0 and seconds is not None else "".join(tail)[-2000:]}


def prepare_data(tmp: Path) -> str:
    """Shakespeare at block size 512, through the CLI (Ray runs in that
    process, not this one)."""
    out = tmp / "shakespeare-512"
    done = subprocess.run(gptdist_command() + ["prepare", "--source", "shakespeare", "--out", str(out),
                                               "--block-size", "512"],
                          cwd=tmp, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"gptdist prepare failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return str(out)


def run(data_path: str | None = None) -> dict:
    """Figures for each command of TARGETS: {name: {"seconds": ..., ...}};
    `data_path` is a prepared Shakespeare at block size 512 (prepared here
    when not given)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = data_path or prepare_data(tmp)
        store = [f"--set=tracking.uri=sqlite:///{tmp}/mlflow.db", f"--set=tracking.runs_dir={tmp}/runs",
                 f"--set=ray.storage_path={tmp}/ray"]
        figures = {
            "help": repeated(["--help"], tmp),
            # the config's own error, not an argparse usage error (also exit code 2)
            "config_error": repeated(["train", "--set", "train.max_steps=ten"], tmp, expect_rc=2,
                                     expect_text="train.max_steps='ten'"),
        }
        figures["first_step"] = first_step(
            ["train", "--local", "--set=model.preset=nano", f"--set=data.path={data}", "--set=train.max_steps=2",
             "--set=train.eval_batches=1", "--set=train.sample_tokens=0", "--set=train.run_name=bench-small",
             *store], tmp)
        checkpoint = str(tmp / "ray" / "bench-small")
        figures["sample"] = repeated(["sample", "--from", checkpoint, "--max-new-tokens", "40", *store], tmp)
        figures["eval"] = repeated(["eval", "--from", checkpoint, "--data", data, "--split", "val", *store], tmp,
                                   repeats=2)
        figures["runs"] = repeated(["runs", *store], tmp)
    figures["section_s"] = time.perf_counter() - started
    return figures


def main() -> None:
    figures = run()
    for name, (target, label) in TARGETS.items():
        seconds = figures[name]["seconds"]
        verdict = "FAILED" if seconds is None else ("met" if seconds <= target else "MISSED")
        shown = "-" if seconds is None else f"{seconds:.2f} s"
        print(f"{label}: {shown} (target {target} s) {verdict}")
        if figures[name].get("output_tail"):
            print(figures[name]["output_tail"])
    print(f"section took {figures['section_s']:.0f} s")
    print(json.dumps({name: figures[name]["seconds"] for name in TARGETS}))


if __name__ == "__main__":
    main()
