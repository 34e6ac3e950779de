"""Sizes torch's intra-op thread team, step by step, to the CPU the engine is getting.

A step is hundreds of parallel regions (every matmul, norm and attention call), each cut
into one equal share per thread and closed by a barrier. When another process takes a
core, the thread sharing it runs a fraction of the time and every barrier waits for it: on
2 cores beside a one-core busy loop a 2-thread team kept 0.14 of its quiet throughput,
not the 0.5 the CPU left allows. A team no larger than the CPUs nobody else is using never
waits on a descheduled thread, so the team follows the CPU taken from us (others' busy
time, our threads' run-queue wait: ``HostLoad``), sampled between steps, within the budget
of affinity and cgroup quota (``cpu_budget``).

libgomp's wait policy is left as it is (spin, then sleep). Beside others' work a team that
does not fit gained about as much from not spinning as from shrinking (an 8-token
completion on a loaded 2-core machine, medians: 2 threads 8.4-10 s spinning, 1.5-3.2 s
with GOMP_SPINCOUNT=3000, 2.2-2.6 s passive, 1.8-2.3 s with 1 thread); but a team that
fits needs the spin: without it every op of a quiet step pays a futex wake-up (195 ->
330 ms for that completion when libgomp stopped spinning, see async_engine.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import torch

from loramux_engine.utils.cpu import CPUBudget, HostLoad, cpu_budget

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.5
# Weight of the newest sample in the running estimate of the CPU taken: a one-off burst
# (a compile, a log rotation) moves the team for one interval, not for good.
_SMOOTHING = 0.5


class ThreadTeam:
    def __init__(
        self,
        fixed: int | None = None,
        budget: Callable[[], CPUBudget] = cpu_budget,
        set_num_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
        host_load: Callable[[frozenset[int]], HostLoad] = HostLoad,
    ) -> None:
        """``fixed`` pins the team (the operator's setting); None follows the CPU we get."""
        self._budget = budget
        self._set = set_num_threads
        self._clock = clock
        self._host_load = host_load
        self.adaptive = fixed is None
        first = budget()
        self.max_threads = fixed or first.num_threads
        self.taken = 0.0  # CPUs' worth of our CPUs not ours to use (HostLoad), smoothed
        self._fresh = True  # no sample yet: the first one is taken as it is
        self._cpus = first.cpus
        self._load = host_load(first.cpus) if self.adaptive else None
        self._next_sample = clock() + SAMPLE_INTERVAL_S
        self.num_threads = self.max_threads
        set_num_threads(self.num_threads)
        self._thread = threading.get_ident()

    def before_step(self) -> None:
        """Resize the team if the CPU left to us changed; cheap when it did not.

        Runs on the thread that runs the step: OpenMP's team size is that thread's own
        setting, so a resize made on another thread would not reach it.
        """
        if self._load is None or self._clock() < self._next_sample:
            return
        self._next_sample = self._clock() + SAMPLE_INTERVAL_S
        budget = self._budget()
        if budget.cpus != self._cpus:  # moved to other CPUs: count load on the new ones
            self._cpus, self._load = budget.cpus, self._host_load(budget.cpus)
            return
        taken = self._load.sample()
        if taken is None:
            return
        self.taken = taken if self._fresh else self.taken + _SMOOTHING * (taken - self.taken)
        self._fresh = False
        self.max_threads = budget.num_threads
        free = min(self.max_threads, len(budget.cpus) - self.taken)
        target = max(1, min(self.max_threads, math.floor(free + 0.5)))
        if target != self.num_threads:
            logger.info(
                "engine threads %d -> %d (%.1f of %d CPUs taken by other work)",
                self.num_threads,
                target,
                self.taken,
                len(budget.cpus),
            )
        elif threading.get_ident() == self._thread:
            return
        self.num_threads, self._thread = target, threading.get_ident()
        self._set(target)

    def stats(self) -> dict[str, float]:
        return {"cpu_threads": float(self.num_threads), "cpu_taken": self.taken}
