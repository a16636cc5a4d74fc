"""The CPU time a deployment's processes have used, read from `/proc`.

The CPU seconds each process spends per upload say which process a difference between two
deployments comes from, which their throughputs alone do not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.harness.workers import WorkerDeployment

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """`/proc/<pid>/stat` from its third field (the state) on: the command name, which may
    hold spaces and parentheses, is cut off at its last closing parenthesis."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _seconds(pid: int, reaped_children: bool = False) -> float:
    """User plus system time of `pid`, and of its children it has waited for if asked."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # utime, stime, cutime, cstime are fields 14 to 17; the list starts at field 3.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS_PER_S


def _children(parent: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == parent:
            yield int(entry.name)


def _postmaster_pid(deployment: WorkerDeployment) -> int:
    return int((deployment.postgres.data / "postmaster.pid").read_text().split()[0])


def cpu_seconds(deployment: WorkerDeployment) -> dict[str, float]:
    """CPU seconds used so far by each of the deployment's processes: the Synapse processes
    by name, `postgres` (the postmaster, its backends and the backends that have exited) and
    `redis`."""
    seconds = {
        process.name: _seconds(process.process.pid)
        for process in deployment.processes
        if process.process is not None
    }
    postmaster = _postmaster_pid(deployment)
    seconds["postgres"] = _seconds(postmaster, reaped_children=True) + sum(
        _seconds(child) for child in _children(postmaster)
    )
    redis = deployment.redis.process
    seconds["redis"] = _seconds(redis.pid) if redis is not None else 0.0
    return seconds


def used_between(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}
