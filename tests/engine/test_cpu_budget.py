"""The CPU budget (affinity, cgroup v1/v2 quota) and others' load, read from fake files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from loramux_engine.utils.cpu import CPUBudget, HostLoad, cgroup_quota, cpu_budget


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc" / "self" / "cgroup"
    write(path, text)
    return path


def test_v2_quota_of_the_process_group(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    write(root / "app" / "cpu.max", "150000 100000\n")
    write(root / "app" / "engine" / "cpu.max", "max 100000\n")
    assert cgroup_quota(root, proc_cgroup(tmp_path, "0::/app/engine\n")) == 1.5


def test_v2_a_parent_limit_binds_its_children(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "app" / "cpu.max", "50000 100000\n")
    write(root / "app" / "engine" / "cpu.max", "400000 100000\n")
    assert cgroup_quota(root, proc_cgroup(tmp_path, "0::/app/engine\n")) == 0.5


def test_v2_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    assert cgroup_quota(root, proc_cgroup(tmp_path, "0::/\n")) is None


def test_container_path_the_mount_does_not_show(tmp_path: Path) -> None:
    """Without a cgroup namespace the path names the host's directory; the mount's root is ours."""
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "200000 100000\n")
    assert cgroup_quota(root, proc_cgroup(tmp_path, "0::/kubepods/pod1/abc\n")) == 2.0


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    group = root / "cpu,cpuacct" / "docker" / "abc"
    write(group / "cpu.cfs_quota_us", "250000\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_quota(root, proc_cgroup(tmp_path, text)) == 2.5


def test_v1_unlimited_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(root, proc_cgroup(tmp_path, "3:cpu:/\n")) is None


@pytest.mark.parametrize("text", ["", "garbage\n", "0::/\n"])
def test_missing_or_odd_files_mean_no_quota(tmp_path: Path, text: str) -> None:
    assert cgroup_quota(tmp_path / "cgroup", proc_cgroup(tmp_path, text)) is None
    assert cgroup_quota(tmp_path / "cgroup", tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("num_cpus", "quota", "threads"),
    [(4, None, 4), (4, 1.5, 2), (4, 1.4, 1), (4, 0.3, 1), (2, 8.0, 2), (1, None, 1)],
)
def test_team_fits_affinity_and_quota(num_cpus: int, quota: float | None, threads: int) -> None:
    assert CPUBudget(frozenset(range(num_cpus)), quota).num_threads == threads


def test_budget_follows_affinity(tmp_path: Path) -> None:
    """Affinity is a thread's own on Linux: a thread pinned to one CPU is budgeted one."""
    cpu = min(os.sched_getaffinity(0))
    seen: list[CPUBudget] = []

    def pinned() -> None:
        os.sched_setaffinity(0, {cpu})
        seen.append(cpu_budget(tmp_path / "cgroup", tmp_path / "proc"))

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen == [CPUBudget(frozenset({cpu}), None)]
    assert seen[0].num_threads == 1
    assert cpu_budget().cpus == frozenset(os.sched_getaffinity(0))


def stat(user0: int, system0: int, user1: int, steal1: int, idle: int) -> str:
    """/proc/stat in ticks: cpu0 and cpu1 are ours, cpu2 is someone else's."""
    return (
        f"cpu  {user0 + user1 + 9000} 0 {system0} {2 * idle} {idle} 0 0 {steal1} 0 0\n"
        f"cpu0 {user0} 0 {system0} 0 0 0 0 0 0 0\n"
        f"cpu1 {user1} 0 0 {idle} {idle} 0 0 {steal1} 0 0\n"
        "cpu2 9000 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n"
    )


def test_host_load_is_busy_time_on_our_cpus_less_ours(tmp_path: Path) -> None:
    hz = os.sysconf("SC_CLK_TCK")  # ticks per second
    now, ours = [100.0], [10.0]
    write(tmp_path / "stat", stat(0, 0, 0, 0, 0))
    load = HostLoad({0, 1}, tmp_path, process_time=lambda: ours[0], clock=lambda: now[0])
    # 2 s later: cpu0 was busy 2 s (user, system), cpu1 1 s (user, steal) and idle or in
    # iowait the rest; this process ran 1.5 s of the 3, so others took 1.5 s in 2 s.
    write(tmp_path / "stat", stat(hz, hz, hz // 2, hz // 2, hz // 2))
    now[0], ours[0] = 102.0, 11.5
    assert load.sample() == pytest.approx(0.75, abs=0.02)
    # 1 s later: cpu0 busy 1 s more, all of it ours
    write(tmp_path / "stat", stat(2 * hz, hz, hz // 2, hz // 2, hz // 2))
    now[0], ours[0] = 103.0, 12.5
    assert load.sample() == 0.0


def test_host_load_without_proc(tmp_path: Path) -> None:
    assert HostLoad({0}, tmp_path / "absent").sample() is None


def test_host_load_counts_our_threads_waiting_to_run(tmp_path: Path) -> None:
    """A neighbour our threads crowd out shows as their run-queue wait, not its busy time."""
    now = [0.0]
    write(tmp_path / "stat", stat(0, 0, 0, 0, 0))

    def schedstat(tid: int, wait_ns: int) -> None:
        write(tmp_path / "self" / "task" / str(tid) / "schedstat", f"5000 {wait_ns} 7\n")

    schedstat(1, 10**9)
    load = HostLoad({0, 1}, tmp_path, process_time=lambda: 0.0, clock=lambda: now[0])
    schedstat(1, 10**9 + 3 * 10**8)  # 0.3 s more
    schedstat(2, 10**8)  # a thread started since: its 0.1 s
    now[0] = 1.0
    assert load.sample() == pytest.approx(0.4)
    (tmp_path / "self" / "task" / "2" / "schedstat").unlink()  # it exited
    now[0] = 2.0
    assert load.sample() == pytest.approx(0.0)
