"""The engine's thread team: sized from the CPU budget, resized as others' load comes and goes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.engine.thread_team import SAMPLE_INTERVAL_S, ThreadTeam
from loramux_engine.utils.cpu import CPUBudget, HostLoad, cpu_budget


class FakeLoad:
    """Others' load as the test sets it."""

    def __init__(self) -> None:
        self.others: float | None = 0.0

    def sample(self) -> float | None:
        return self.others


class Host:
    def __init__(self, cpus: int = 2, quota: float | None = None) -> None:
        self.budget = CPUBudget(frozenset(range(cpus)), quota)
        self.load = FakeLoad()
        self.now = 0.0
        self.calls: list[tuple[int, int]] = []  # (threads, calling thread)

    def team(self, fixed: int | None = None) -> ThreadTeam:
        return ThreadTeam(
            fixed,
            budget=lambda: self.budget,
            set_num_threads=lambda n: self.calls.append((n, threading.get_ident())),
            clock=lambda: self.now,
            host_load=self.host_load,
        )

    def host_load(self, cpus: frozenset[int]) -> HostLoad:
        return self.load  # type: ignore[return-value]

    def step(self, team: ThreadTeam, others: float | None) -> int:
        self.load.others = others
        self.now += SAMPLE_INTERVAL_S
        team.before_step()
        return team.num_threads


def test_team_starts_at_the_budget() -> None:
    host = Host(cpus=4, quota=2.0)
    team = host.team()
    assert team.num_threads == team.max_threads == 2
    assert [n for n, _ in host.calls] == [2]


def test_team_shrinks_beside_a_busy_core_and_grows_back() -> None:
    host = Host(cpus=2)
    team = host.team()
    assert host.step(team, 1.0) == 1  # a one-core busy loop: the one CPU left, one thread
    assert host.step(team, 1.0) == 1
    assert host.step(team, 0.0) == 2  # it stopped: both CPUs again
    assert host.step(team, 2.0) == 1
    assert host.step(team, 0.2) == 1  # smoothed: the burst of 2 CPUs still weighs in
    assert host.step(team, 0.2) == 2
    assert [n for n, _ in host.calls] == [2, 1, 2, 1, 2]
    assert team.stats()["cpu_threads"] == 2.0


def test_team_never_drops_below_one_thread() -> None:
    host = Host(cpus=2)
    team = host.team()
    assert host.step(team, 7.0) == 1


def test_no_sample_before_the_interval() -> None:
    host = Host(cpus=2)
    team = host.team()
    host.load.others = 2.0
    host.now += SAMPLE_INTERVAL_S / 2
    team.before_step()
    assert team.num_threads == 2


def test_unreadable_load_keeps_the_team() -> None:
    host = Host(cpus=2)
    team = host.team()
    assert host.step(team, None) == 2


def test_a_fixed_team_is_never_resized() -> None:
    host = Host(cpus=4)
    team = host.team(fixed=3)
    assert host.step(team, 3.0) == 3
    assert [n for n, _ in host.calls] == [3]


def test_a_new_quota_resizes_the_team() -> None:
    host = Host(cpus=4)
    team = host.team()
    host.budget = CPUBudget(host.budget.cpus, 1.0)
    assert host.step(team, 0.0) == 1


def test_resize_reaches_the_thread_that_steps() -> None:
    """OpenMP's team size is per thread: the stepping thread must be told, not the builder."""
    host = Host(cpus=2)
    team = host.team()
    loop = threading.Thread(target=lambda: host.step(team, 0.0))
    loop.start()
    loop.join()
    assert host.calls[-1] == (2, loop.ident)


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """An engine resizes the team of the thread that builds and steps it: put it back."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_engine_team_follows_the_budget(tiny_llama_dir: Path, torch_threads: int) -> None:
    engine = LLMEngine(EngineConfig(str(tiny_llama_dir)))
    assert engine.threads.adaptive
    assert engine.threads.max_threads == cpu_budget().num_threads
    engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2))
    assert engine.stats().extra["cpu_threads"] == engine.threads.num_threads


def test_engine_fixed_threads(tiny_llama_dir: Path, torch_threads: int) -> None:
    engine = LLMEngine(EngineConfig(str(tiny_llama_dir), num_threads=1))
    assert not engine.threads.adaptive
    assert torch.get_num_threads() == 1
