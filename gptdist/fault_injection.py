"""Fault injection and row auditing for the reliability tests.

`FaultHooks` is one object the training loop calls at four fixed points
(start, before a step, after a step, while writing a checkpoint) and lets
touch the model once. All of it is off unless a test (or
`train.fail_at_step`) asks; none of it changes what a normal run computes.
Markers live in the run's storage folder so that a retried attempt goes
past the fault instead of looping.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class InjectedFault(RuntimeError):
    """Raised by `train.fail_at_step` to test recovery."""


@dataclass
class FaultHooks:
    audit_dir: str | None = None  # each rank appends the rows it trained at each step
    pid_dir: str | None = None  # each rank writes its PID, for a test to SIGKILL it
    fail_at_step: int | None = None  # raise InjectedFault in every rank, once (train.fail_at_step)
    kill_while_checkpointing_step: int | None = None  # SIGKILL rank 0 between model.pt and meta.json, once
    nan_loss_from_step: int | None = None  # NaN losses from this step on
    marker_dir: str = ""  # set by the driver: the run's folder
    step: int = 0  # the step being trained (read by the NaN hook)

    def on_start(self, rank: int) -> None:
        if self.pid_dir:
            Path(self.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))

    def attach(self, model: torch.nn.Module) -> None:
        """Make every forward pass from `nan_loss_from_step` on produce NaN
        hidden states at the head, hence a NaN loss (whichever loss path runs)."""
        if self.nan_loss_from_step is None:
            return

        def hook(module, inputs, output):
            return output * float("nan") if self.step >= self.nan_loss_from_step else output

        model.transformer.ln_f.register_forward_hook(hook)

    def before_step(self, step: int, rank: int) -> None:
        self.step = step
        if self.fail_at_step is None or step != self.fail_at_step:
            return
        marker = Path(self.marker_dir) / f"fault-injected-step-{step}"
        if marker.exists():
            return
        if dist.is_initialized():
            dist.barrier()  # every rank has checked the marker before it appears
        if rank == 0:
            self._first_time(marker.name)
        raise InjectedFault(f"injected fault at step {step} (train.fail_at_step)")

    def after_step(self, step: int, rank: int, rows: list[int]) -> None:
        if not self.audit_dir:
            return
        path = Path(self.audit_dir) / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "rows": rows}) + "\n")

    def while_checkpointing(self, step: int) -> None:
        if self.kill_while_checkpointing_step == step and self._first_time(f"killed-ckpt-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)

    def _first_time(self, name: str) -> bool:
        marker = Path(self.marker_dir) / name
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True
