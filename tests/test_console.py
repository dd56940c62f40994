"""The console contract: a command prints gptdist's lines and not Ray's
housekeeping (lines below are as Ray 2.60 printed them in real runs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from gptdist.console import QuietStream, keep

REPO = Path(__file__).resolve().parents[1]
CYAN, RESET = "\x1b[36m", "\x1b[0m"

NOISE = [
    f"{CYAN}(TrainController pid=29050){RESET} [2026-12-03 03:37:09,148 E 29050 29081] core_worker.cc:2465: "
    "Actor with class name: 'PreemptionWatcher' and ID: '2e30b64d' has constructor arguments in the object "
    "store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
    "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    f"{CYAN}(RayTrainWorker pid=29207){RESET} Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    f"{CYAN}(PlacementGroupCleaner pid=812){RESET} Found multiple active Ray instances: {{'127.0.0.1:6379'}}.",
    "\x1b[2m\x1b[36m(pid=29311) \x1b[0mRunning Dataset dataset_0358.: 0.00 row [00:00, ? row/s]",
]


def test_noise_lines_are_dropped():
    for line in NOISE:
        assert keep(line) is None, line


def test_gptdist_worker_lines_lose_rays_prefix_and_others_keep_it():
    step = "step 3/6 | loss 10.7711 | val 10.7076 | lr 2.73e-04 | 1,455 ms/step | 352 tok/s | mfu 0.4% | eta 0m04s"
    assert keep(f"{CYAN}(RayTrainWorker pid=29207){RESET} {step}") == step
    for own in ("precision auto: fp32 (this model's matmuls, 2 threads, cached: fp32 66 GFLOP/s, ...)",
                "attention auto: matmul (one layer forward + backward, cached: SDPA 103.9 ms, matmuls 71.7 ms; ...)"):
        assert keep(f"{CYAN}(RayTrainWorker pid=28149){RESET} {own}") == own
    error = f"{CYAN}(RayTrainWorker pid=29207){RESET} Error in training function:"
    assert keep(error) == error
    assert keep("run noise1 finished at step 6") == "run noise1 finished at step 6"


def test_quiet_stream_passes_whole_lines():
    out = io.StringIO()
    stream = QuietStream(out)
    stream.write("step 1/2 | loss")
    assert out.getvalue() == ""  # a line is judged when it is whole
    stream.write(" 10.7\n" + NOISE[1] + "\n")
    assert out.getvalue() == "step 1/2 | loss 10.7\n"


def test_a_bad_corpus_file_is_one_line(tmp_path):
    """`gptdist prepare` of a JSONL file with a broken line: the error line
    and nothing of Ray Data's traceback or retry advice."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GPTDIST_VERBOSE")}
    out = subprocess.run([sys.executable, "-m", "gptdist.cli", "prepare", "--source", str(tmp_path / "bad.jsonl"),
                          "--out", str(tmp_path / "out"), "--set", "ray.local_num_cpus=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"gptdist prepare: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)"], out.stderr
    assert out.stdout.strip().splitlines() == [f"preparing {tmp_path / 'out'}: tokenizing 1 file(s) with Ray Data ..."]
