"""The three-tier adapter cache: byte budgets, pinning, integrity, the loader, counters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loramux_engine.lora.adapter import WEIGHTS_NAME, parse_adapter
from loramux_engine.lora.cache import AdapterCache
from loramux_engine.lora.errors import (
    AdapterIntegrityError,
    AdapterLoadError,
    UnsupportedAdapterError,
)
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.lora.source import DirectorySource
from tests.engine.lora.adapters import (
    MAX_RANK,
    TINY,
    MakeAdapter,
    publish,
    read_files,
    variant_weights,
)

MakeCache = Callable[..., AdapterCache]


class CountingSource(DirectorySource):
    """Counts fetches; fetches of the shas in `gates` wait until their event is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def fetch(self, ref: AdapterRef, dest_dir: Path) -> None:
        gate = self.gates.get(ref.sha256)
        if gate is not None:
            assert gate.wait(10), "test gate never opened"
        self.fetched.append(ref.sha256)
        super().fetch(ref, dest_dir)


@pytest.fixture
def refs(make_adapter: MakeAdapter, tmp_path: Path) -> list[AdapterRef]:
    """Six adapters of equal size with different contents, published to a source dir."""
    path, _ = make_adapter(r=4, target_modules="all-linear")
    config, _ = read_files(path)
    root = tmp_path / "source"
    return [publish(root, config, variant_weights(path, 1 + i), f"adapter-{i}") for i in range(6)]


@pytest.fixture
def source(tmp_path: Path) -> CountingSource:
    return CountingSource(tmp_path / "source")


def adapter_bytes(source: CountingSource, ref: AdapterRef) -> int:
    files = read_files(source.root / ref.sha256)
    return parse_adapter(*files, TINY, MAX_RANK).num_bytes


def dir_bytes(source: CountingSource, ref: AdapterRef) -> int:
    return sum(p.stat().st_size for p in (source.root / ref.sha256).iterdir())


@pytest.fixture
def make_cache(tmp_path: Path, source: CountingSource) -> Iterator[MakeCache]:
    caches: list[AdapterCache] = []

    def make(num_slots: int = 3, **budgets: int) -> AdapterCache:
        budgets.setdefault("host_budget_bytes", 1 << 30)
        budgets.setdefault("disk_budget_bytes", 1 << 30)
        pool = LoRASlotPool(TINY, num_slots=num_slots, max_rank=MAX_RANK)
        cache = AdapterCache(pool, source, disk_dir=tmp_path / "disk", **budgets)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def wait_slot(cache: AdapterCache, ref: AdapterRef) -> int:
    """Poll as the engine does between steps until the adapter is resident and pinned."""
    for _ in range(10_000):
        slot = cache.acquire(ref)
        if slot is not None:
            return slot
        cache.poll()
        time.sleep(0.001)
    raise AssertionError("adapter never became resident")


def wait_failure(cache: AdapterCache, ref: AdapterRef) -> AdapterLoadError:
    assert cache.acquire(ref) is None
    for _ in range(10_000):
        failures = cache.poll()
        if failures:
            assert [r for r, _ in failures] == [ref]
            return failures[0][1]
        time.sleep(0.001)
    raise AssertionError("load never failed")


def test_cold_load_then_hits(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache()
    assert cache.can_admit(refs[0]) and not cache.is_ready(refs[0])
    assert cache.acquire(refs[0]) is None
    slot = wait_slot(cache, refs[0])
    assert cache.is_ready(refs[0]) and cache.acquire(refs[0]) == slot
    cache.release(refs[0])
    cache.release(refs[0])

    expected = parse_adapter(*read_files(source.root / refs[0].sha256), TINY, MAX_RANK)
    stack = cache.pool.stack(1, "down_proj")
    assert torch.equal(stack.a[slot, :4], expected.weights[(1, "down_proj")].a)
    assert (cache._disk.root / refs[0].sha256 / WEIGHTS_NAME).is_file()
    stats = cache.stats()
    assert stats["device"]["misses"] == 1 and stats["device"]["loads"] == 1
    assert stats["device"]["hits"] == 2  # the acquire that found it loaded, then one more
    assert stats["host"]["misses"] == 1 and stats["host"]["loads"] == 1
    assert stats["disk"]["misses"] == 1 and stats["disk"]["loads"] == 1
    assert stats["host"]["bytes"] == expected.num_bytes
    assert source.fetched == [refs[0].sha256]


def test_device_lru_and_pinning(make_cache: MakeCache, refs: list[AdapterRef]) -> None:
    cache = make_cache(num_slots=3)  # two usable slots
    a, b, c, d = refs[:4]
    for ref in (a, b):
        wait_slot(cache, ref)
        cache.release(ref)
    wait_slot(cache, a)  # a is now the most recently used, and pinned
    wait_slot(cache, c)  # evicts b, the least recently used unpinned
    assert cache.is_ready(a) and cache.is_ready(c) and not cache.is_ready(b)

    assert not cache.can_admit(d)  # both slots are pinned
    assert cache.acquire(d) is None
    for _ in range(50):
        cache.poll()
        time.sleep(0.001)
    assert not cache.is_ready(d) and cache.is_ready(a) and cache.is_ready(c)
    cache.release(c)
    cache.poll()  # d was loaded on the host and takes c's slot now
    assert cache.is_ready(d) and not cache.is_ready(c) and cache.is_ready(a)
    assert cache.stats()["device"]["evictions"] == 2
    with pytest.raises(ValueError, match="without a matching acquire"):
        cache.release(c)


def test_host_hit_is_immediate(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache(num_slots=2)  # one usable slot
    for ref in refs[:2]:
        wait_slot(cache, ref)
        cache.release(ref)
    assert cache.acquire(refs[0]) is not None  # back from the host tier, no loader trip
    assert cache.stats()["host"]["hits"] == 1
    assert source.fetched == [refs[0].sha256, refs[1].sha256]


def test_host_budget_in_bytes(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    size = adapter_bytes(source, refs[0])
    cache = make_cache(num_slots=2, host_budget_bytes=int(2.5 * size))
    for ref in refs[:3]:
        wait_slot(cache, ref)
        cache.release(ref)
    stats = cache.stats()
    assert stats["host"]["evictions"] == 1 and stats["host"]["bytes"] == 2 * size
    wait_slot(cache, refs[0])  # evicted from the host: read back from disk, not fetched
    assert cache.stats()["disk"]["hits"] == 1 and len(source.fetched) == 3


def test_disk_budget_and_restart(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    size = dir_bytes(source, refs[0])
    cache = make_cache(disk_budget_bytes=int(2.5 * size))
    for ref in refs[:3]:
        wait_slot(cache, ref)
        cache.release(ref)
    assert cache.stats()["disk"]["evictions"] == 1
    on_disk = sorted(p.name for p in cache._disk.root.iterdir() if not p.name.startswith("."))
    assert on_disk == sorted(r.sha256 for r in refs[1:3])

    restarted = make_cache(disk_budget_bytes=int(2.5 * size))
    wait_slot(restarted, refs[2])
    assert restarted.stats()["disk"]["hits"] == 1 and len(source.fetched) == 3


def test_sha_mismatch_refused(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache()
    forged = AdapterRef(id="forged", sha256=refs[1].sha256)
    (source.root / forged.sha256 / WEIGHTS_NAME).write_bytes(
        (source.root / refs[0].sha256 / WEIGHTS_NAME).read_bytes()
    )
    error = wait_failure(cache, forged)
    assert isinstance(error.__cause__, AdapterIntegrityError)
    assert "forged" in str(error) and "does not match sha256" in str(error)
    with pytest.raises(AdapterLoadError):
        cache.acquire(forged)
    assert not (cache._disk.root / forged.sha256).exists()
    assert wait_slot(cache, refs[0])  # other adapters are unaffected


def test_unsupported_reported_per_adapter(
    make_cache: MakeCache, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    path, _ = make_adapter(use_dora=True)
    ref = publish(tmp_path / "source", *read_files(path), "dora")
    cache = make_cache()
    error = wait_failure(cache, ref)
    assert isinstance(error.__cause__, UnsupportedAdapterError) and "DoRA" in str(error)


def test_slow_fetch_does_not_block(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache(num_slots=4)
    wait_slot(cache, refs[0])
    gate = source.gates[refs[1].sha256] = threading.Event()
    assert cache.acquire(refs[1]) is None  # its fetch now hangs on the gate
    assert cache.acquire(refs[0]) is not None  # resident adapters are served meanwhile
    wait_slot(cache, refs[2])  # and another cold adapter loads past the slow one
    assert not cache.is_ready(refs[1])
    gate.set()
    wait_slot(cache, refs[1])


def test_drop(make_cache: MakeCache, refs: list[AdapterRef]) -> None:
    cache = make_cache()
    slot = wait_slot(cache, refs[0])
    cache.drop(refs[0])
    assert cache.is_ready(refs[0])  # pinned: its slot stays until the request ends
    cache.release(refs[0])
    assert not cache.is_ready(refs[0])
    assert not cache.pool.stack(0, "q_proj").a[slot].any()
    assert not (cache._disk.root / refs[0].sha256).exists()
    assert cache.stats()["host"]["bytes"] == 0
