"""How much CPU this process may use, and how much of it the rest of the host is taking.

``cpu_budget`` reads the hard limits: the CPUs the scheduler lets this process run on
(affinity, which a container's cpuset sets) and the cgroup's CPU quota (v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us``), the lowest along the cgroup's path. ``HostLoad`` reads the soft
one: how busy those CPUs were with work that is not ours (a sidecar, a noisy neighbour,
another engine), from the kernel's per-CPU counters. Both read plain files under roots a
test can point at fake ones.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True, slots=True)
class CPUBudget:
    cpus: frozenset[int]  # the CPUs this process may run on
    quota: float | None  # the cgroup's CPU quota in CPUs; None: unlimited

    @property
    def num_threads(self) -> int:
        """A thread team that fits: one per CPU, no more than the quota pays for.

        A fractional quota rounds to the nearest CPU (at least one): the cgroup's threads
        are throttled together, so a team one larger than the quota loses a slice of each
        period rather than waiting at every barrier for a thread that is not running.
        """
        if self.quota is None:
            return max(1, len(self.cpus))
        return max(1, min(len(self.cpus), math.floor(self.quota + 0.5)))


def cpu_budget(cgroup_root: Path = CGROUP_ROOT, proc_root: Path = PROC_ROOT) -> CPUBudget:
    return CPUBudget(affinity(), cgroup_quota(cgroup_root, proc_root / "self" / "cgroup"))


def affinity() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cgroup_quota(root: Path, self_cgroup: Path) -> float | None:
    """The smallest CPU quota on this process's cgroup path, in CPUs; None when unlimited.

    Each directory from the mount's root down to the process's own group is read: a limit
    on a parent binds its children too. Inside a container the path is often "/" (its own
    namespace) or names a directory its mount does not show; then the mount's root is the
    group.
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            quotas += _quotas(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in _V1_CPU_MOUNTS:
                quotas += _quotas(root / mount, path, _v1_quota)
    return min(quotas, default=None)


def _quotas(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    found = []
    for depth in range(len(parts) + 1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(group: Path) -> float | None:
    try:
        quota, _, period = (group / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else _ratio(quota, period or "100000")
    except (OSError, ValueError):
        return None


def _v1_quota(group: Path) -> float | None:
    try:
        quota = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
        return None if int(quota) < 0 else _ratio(quota, period)
    except (OSError, ValueError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


class HostLoad:
    """CPUs' worth of our CPUs that were not ours, between one ``sample`` and the next.

    Two parts, over the wall time between samples. Others' work: busy time on those CPUs
    (everything but idle and iowait; steal included, a hypervisor's theft is CPU we do not
    get either) less this process's own CPU time (all its threads, spinning ones included).
    And our own threads' time in a run queue, runnable but not running (per-thread
    schedstat): others' busy time shows what a neighbour got, not what it wanted, so
    alone it undercounts one our threads crowd out (beside a one-core busy loop a spinning
    2-thread team took 1.6 of 2 CPUs, the loop 0.4, and our threads waited the other 0.4).
    """

    def __init__(
        self,
        cpus: Iterable[int],
        proc_root: Path = PROC_ROOT,
        process_time: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._names = {f"cpu{c}" for c in cpus}
        self._stat = proc_root / "stat"
        self._tasks = proc_root / "self" / "task"
        self._waits: dict[str, int] = {}
        self._process_time = process_time
        self._clock = clock
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._last = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        """(wall, busy seconds on our CPUs, our CPU seconds, our run-queue wait seconds
        since the last read); None when /proc is not there."""
        try:
            text = self._stat.read_text()
        except OSError:
            return None
        busy = 0
        for line in text.splitlines():
            fields = line.split()
            if fields and fields[0] in self._names:
                # user nice system idle iowait irq softirq steal (guest is inside user)
                ticks = [int(v) for v in fields[1:9]]
                busy += sum(ticks) - ticks[3] - ticks[4]
        return self._clock(), busy * self._tick_s, self._process_time(), self._wait_s()

    def _wait_s(self) -> float:
        """Our threads' new run-queue wait; threads started since count from their start."""
        waits: dict[str, int] = {}
        try:
            tids = [entry.name for entry in os.scandir(self._tasks)]
        except OSError:
            return 0.0
        for tid in tids:
            try:  # run ns, wait ns, timeslices; a thread may exit while we read
                waits[tid] = int((self._tasks / tid / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
        new = sum(wait - self._waits.get(tid, 0) for tid, wait in waits.items())
        self._waits = waits
        return max(0, new) / 1e9

    def sample(self) -> float | None:
        """CPUs taken from us since the last sample; None when it cannot be read."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        others = max(0.0, (now[1] - last[1]) - (now[2] - last[2]))
        return (others + now[3]) / (now[0] - last[0])
