"""Fault injection and auditing hooks for the reliability tests.

All of them are off unless a test (or `train.fail_at_step`) asks; none
changes what a normal run computes. Markers live in the run's storage
folder so that a retried attempt goes past the fault instead of looping.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from gptdist.config import Config


class InjectedFault(RuntimeError):
    """Raised by `train.fail_at_step` to test recovery."""


def _first_time(marker_dir: str, name: str) -> bool:
    marker = Path(marker_dir) / name
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def maybe_inject_fault(step: int, cfg: Config, marker_dir: str) -> None:
    """Fail once at train.fail_at_step; a marker file in the run's storage
    makes the retried attempt go past it."""
    if cfg.train.fail_at_step is None or step != cfg.train.fail_at_step:
        return
    marker = Path(marker_dir) / f"fault-injected-step-{step}"
    if marker.exists():
        return
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the marker before it appears
    if ray.train.get_context().get_world_rank() == 0:
        _first_time(marker_dir, marker.name)
    raise InjectedFault(f"injected fault at step {step} (train.fail_at_step)")


def append_audit(audit_dir: str | None, step: int, rank: int, rows: list[int]) -> None:
    """Row audit for tests: which rows each rank trained at each step."""
    if not audit_dir:
        return
    path = Path(audit_dir) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "rank": rank, "rows": rows}) + "\n")




def write_pid(pid_dir: str | None, rank: int) -> None:
    """So a test can SIGKILL a worker process from outside."""
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))


def maybe_die_while_checkpointing(hooks: dict, step: int, marker_dir: str) -> None:
    """SIGKILL this process half-way through writing a checkpoint (after
    model.pt, before meta.json), once."""
    if hooks.get("kill_while_checkpointing_step") == step and _first_time(marker_dir, f"killed-ckpt-{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss_from(model: torch.nn.Module, hooks: dict, step_ref: list[int]) -> None:
    """Make every forward pass from a step on produce NaN hidden states at
    the head, hence a NaN loss (whichever loss path runs)."""
    start = hooks.get("nan_loss_from_step")
    if start is None:
        return

    def hook(module, inputs, output):
        return output * float("nan") if step_ref[0] >= start else output

    model.transformer.ln_f.register_forward_hook(hook)
