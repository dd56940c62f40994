"""Find and stop exactly the processes that cluster/start_local.sh started.

`ray stop` would stop every Ray process on the machine, including other
people's clusters and `gptdist train --local` runs, so the local scripts
never call it. Instead each service is started in a fresh session
(`setsid`), which makes its process group id a handle on everything it
spawned: the Ray head's daemons (gcs_server, raylet, dashboard, monitor,
agents) all stay in the group of the `ray start` that made them. Ray's
worker processes and job drivers move to groups of their own, but they are
descendants of the raylet, so the group plus its descendants is the whole
set.

Only the standard library is used (no psutil), so any python3 can run it.

Stopping follows `ray stop`'s order: the raylet first (the agents and
workers fate-share with it), then everything else, then the GCS last;
SIGTERM, and SIGKILL for what is still alive after the grace period.

    python cluster/local_processes.py members PGID      # "PID START NAME" lines
    python cluster/local_processes.py running PGID [--recorded FILE]   # exit status 0: yes
    python cluster/local_processes.py stop PGID [--grace SECONDS] [--recorded FILE]

PIDs are reused (pid_max is 32768 on many machines), so a group id read
from a state file may name someone else's processes by the time it is
stopped, after a reboot say. The start scripts therefore save `members`
output; `stop --recorded FILE` stops the group only while one of the
processes recorded there (same PID, same start time) is still in it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    name: str
    # Start time in clock ticks since boot: with the PID it names one process
    # even after the PID is reused.
    start: int


def read_proc(pid: int) -> Proc | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent can reap it
        return None
    return Proc(pid, int(fields[1]), int(fields[2]), name, int(fields[19]))


def all_processes() -> list[Proc]:
    procs = (read_proc(int(d.name)) for d in PROC.iterdir() if d.name.isdigit())
    return [p for p in procs if p is not None]


def group_members(pgid: int) -> list[Proc]:
    """Processes whose process group is `pgid`, and all their descendants."""
    procs = all_processes()
    found = {p.pid: p for p in procs if p.pgid == pgid}
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return sorted(found.values(), key=lambda p: p.pid)


def is_alive(p: Proc) -> bool:
    now = read_proc(p.pid)
    return now is not None and now.start == p.start


def _signal(procs: list[Proc], sig: int) -> None:
    for p in procs:
        if is_alive(p):
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def _wait(procs: list[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if is_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def stop_group(pgid: int, grace: float = 10.0) -> list[int]:
    """Stop the group `pgid` and its descendants in Ray's order. Returns the
    PIDs that had to be killed with SIGKILL."""
    procs = group_members(pgid)
    first = [p for p in procs if p.name == "raylet"]
    last = [p for p in procs if p.name == "gcs_server"]
    middle = [p for p in procs if p not in first and p not in last]
    buckets = [b for b in (first, middle, last) if b]
    stubborn: list[Proc] = []
    # Each bucket gets its share of the grace period, as in `ray stop`.
    for bucket in buckets:
        _signal(bucket, signal.SIGTERM)
        stubborn += _wait(bucket, grace / len(buckets))
    # Anything the first look did not see (a worker spawned while stopping).
    stubborn += [p for p in group_members(pgid) if p not in procs]
    _signal(stubborn, signal.SIGKILL)
    _wait(stubborn, 5)
    return [p.pid for p in stubborn]


def read_record(path: Path) -> set[tuple[int, int]]:
    """(PID, start time) pairs saved from `members` output."""
    pairs = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            pairs.add((int(parts[0]), int(parts[1])))
    return pairs


def is_recorded_group(pgid: int, record: Path) -> bool:
    return any((p.pid, p.start) in read_record(record) for p in group_members(pgid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("members", help="print the PIDs of a process group and its descendants")
    p.add_argument("pgid", type=int)
    p = sub.add_parser("running", help="exit status 0 when the group has live processes")
    p.add_argument("pgid", type=int)
    p.add_argument("--recorded", type=Path, help="`members` output saved at start")
    p = sub.add_parser("stop", help="stop a process group and its descendants")
    p.add_argument("pgid", type=int)
    p.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL")
    p.add_argument("--recorded", type=Path, help="`members` output saved at start")
    args = parser.parse_args(argv)
    if args.command == "members":
        for proc in group_members(args.pgid):
            print(proc.pid, proc.start, proc.name)
        return 0
    if args.command == "running":
        if args.recorded:
            return 0 if is_recorded_group(args.pgid, args.recorded) else 1
        return 0 if group_members(args.pgid) else 1
    if args.recorded and not is_recorded_group(args.pgid, args.recorded):
        print(f"process group {args.pgid} holds none of the processes in {args.recorded} "
              "(they have exited); nothing stopped", file=sys.stderr)
        return 0
    killed = stop_group(args.pgid, args.grace)
    if killed:
        print(f"killed with SIGKILL after {args.grace:g} s: {killed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
