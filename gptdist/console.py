"""What a gptdist command prints: its own lines, and Ray's only when asked.

Ray forwards every worker's stdout and stderr to the driver and prints
them there, each line prefixed "(RayTrainWorker pid=N)". Ray has no
per-line filter for that stream (`log_to_driver` is all or nothing, and
gptdist's progress lines come from rank 0 through it), so while a command
runs the driver's sys.stdout and sys.stderr go through `QuietStream`: it
drops the lines in NOISE and prints gptdist's own worker lines without
Ray's prefix. Every dropped line is still in Ray's log folder (named once
when a command starts Ray). `--verbose` (GPTDIST_VERBOSE=1) prints all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "GPTDIST_VERBOSE"

# Worker lines of Ray's that say nothing to someone training a model.
NOISE = re.compile("|".join([
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
    r"Progress bars disabled\. To enable, set",
    r"Found multiple active Ray instances",
    r"Running Dataset\b.*row/s",
    r"Dataset \S+ execution finished in",
    r"Ray deduplicates logs by default",
]))
# gptdist's own worker lines (train_loop): printed without Ray's prefix.
OWN_LINE = re.compile(r"(step +\d+/\d+ \||precision (auto|fp32|bf16)|attention auto:|checkpoint \S+ is incomplete)")
RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^)]*pid=[^)]*\)(?:\x1b\[[0-9;]*m)* ")
# Driver-side loggers whose INFO lines are Ray's and MLflow's housekeeping.
QUIET_LOGGERS = {
    "ray": logging.WARNING,
    "ray._private.authentication": logging.ERROR,  # "token authentication is enabled": it is, by design
    "mlflow": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."
    "alembic": logging.WARNING,
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class QuietStream:
    """A text stream that passes whole lines on, minus Ray's noise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            kept = keep(line)
            if kept is not None:
                self.stream.write(kept + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def keep(line: str) -> str | None:
    """The line as printed, or None when it is noise."""
    if NOISE.search(line):
        return None
    prefix = RAY_PREFIX.match(line)
    if prefix and OWN_LINE.match(line[prefix.end():]):
        return line[prefix.end():]
    return line


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Filter the driver's output for the length of one command."""
    if verbose():
        yield
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    quiet_ray_data_console()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = QuietStream(out), QuietStream(err)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, QuietStream) and stream.pending:
                stream.write("\n")
        sys.stdout, sys.stderr = out, err


RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_ray_data_console() -> None:
    """Ray Data configures its "ray.data" logger from the file named by
    RAY_DATA_LOGGING_CONFIG (its documented knob) when imported, and the
    processes of a local Ray started later inherit the variable. A user's
    own setting wins."""
    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING)
    if "ray.data" in sys.modules:
        from ray.data._internal.logging import configure_logging

        configure_logging()
