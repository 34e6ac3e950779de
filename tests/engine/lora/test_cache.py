"""The three-tier adapter cache: byte budgets, pinning, integrity, the loader, counters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loramux_engine.engine.kv_cache import BlockManager
from loramux_engine.engine.scheduler import Scheduler
from loramux_engine.engine.sequence import Sequence
from loramux_engine.lora.adapter import WEIGHTS_NAME, LoRAAdapter, LoRAWeights, parse_adapter
from loramux_engine.lora.cache import AdapterCache
from loramux_engine.lora.errors import (
    AdapterIntegrityError,
    AdapterLoadError,
    UnsupportedAdapterError,
)
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.lora.source import DirectorySource
from loramux_engine.sampling_params import SamplingParams
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


# -- failed writes into the pool return their slot ------------------------------------


def _narrow_cache(tmp_path: Path, source: CountingSource, num_slots: int = 3) -> AdapterCache:
    """A cache whose pool holds only q_proj: an all-linear adapter cannot be written to it."""
    pool = LoRASlotPool(TINY, num_slots=num_slots, max_rank=MAX_RANK, projections=["q_proj"])
    return AdapterCache(
        pool,
        source,
        host_budget_bytes=1 << 30,
        disk_dir=tmp_path / "disk",
        disk_budget_bytes=1 << 30,
    )


def test_failed_pool_writes_leave_every_slot_usable(
    make_adapter: MakeAdapter, tmp_path: Path, source: CountingSource
) -> None:
    unfit, _ = make_adapter(r=4, target_modules="all-linear")
    fit, _ = make_adapter(seed=1, r=4, target_modules=["q_proj"])
    unfit_config, _ = read_files(unfit)
    fit_config, _ = read_files(fit)
    attacks = [
        AdapterRef(f"attack-{i}", publish(source.root, unfit_config, w, "x").sha256, "attacker")
        for i, w in enumerate(variant_weights(unfit, 1 + i / 16) for i in range(15))
    ]
    victims = [
        AdapterRef(f"victim-{i}", publish(source.root, fit_config, w, "x").sha256, "victim")
        for i, w in enumerate(variant_weights(fit, 1 + i) for i in range(2))
    ]
    cache = _narrow_cache(tmp_path, source)
    try:
        for ref in attacks:
            error = wait_failure(cache, ref)
            assert "attack-" in str(error) and "holds no stacks" in str(error)
            with pytest.raises(AdapterLoadError, match="holds no stacks"):
                cache.acquire(ref)  # its requests fail at admission, none waits forever
        assert cache.stats()["device"]["free"] == 2 and cache.stats()["host"]["bytes"] == 0
        slots = {wait_slot(cache, ref) for ref in victims}  # both pinned at once
        assert slots == {1, 2}
        for ref in victims:
            assert cache.pool.stack(0, "q_proj").ranks[cache.acquire(ref) or 0] == 4
    finally:
        cache.close()


def test_a_failed_host_hit_placement_returns_the_slot(
    make_adapter: MakeAdapter, tmp_path: Path, source: CountingSource
) -> None:
    """The same failure on the acquire path (adapter already parsed on the host)."""
    unfit, _ = make_adapter(r=4, target_modules="all-linear")
    ref = publish(source.root, *read_files(unfit), "unfit")
    cache = _narrow_cache(tmp_path, source, num_slots=2)
    try:
        cache._host.put(ref.cache_key, parse_adapter(*read_files(unfit), TINY, MAX_RANK))
        with pytest.raises(AdapterLoadError, match="holds no stacks"):
            cache.acquire(ref)
        assert cache.stats()["device"]["free"] == 1 and cache.stats()["host"]["bytes"] == 0
    finally:
        cache.close()


def test_a_write_failing_part_way_leaves_the_slot_zeroed(
    make_adapter: MakeAdapter,
) -> None:
    pool = LoRASlotPool(TINY, num_slots=2, max_rank=MAX_RANK)
    path, _ = make_adapter(r=16, target_modules="all-linear")
    adapter = parse_adapter(*read_files(path), TINY, MAX_RANK)
    pool.load(1, adapter)
    # The last stack's A cannot be copied (no data on the meta device): earlier stacks
    # have been written by then.
    last = list(pool.stacks)[-1]
    weights = dict(adapter.weights)
    good = weights[last]
    weights[last] = LoRAWeights(torch.empty(good.a.shape, device="meta"), good.b, good.scale)
    broken = LoRAAdapter(config=adapter.config, weights=weights, num_bytes=adapter.num_bytes)
    with pytest.raises(NotImplementedError):
        pool.load(1, broken)
    for stack in pool.stacks.values():
        assert stack.ranks[1] == 0 and stack.scales[1] == 0.0
        assert not stack.a[1].any() and not stack.b_t[1].any()
    pool.load(1, adapter)
    assert torch.equal(pool.stack(*last).a[1, :16], good.a)


def test_scheduler_fails_requests_of_unwritable_adapters_and_keeps_admitting(
    make_adapter: MakeAdapter, tmp_path: Path, source: CountingSource
) -> None:
    unfit, _ = make_adapter(r=4, target_modules="all-linear")
    fit, _ = make_adapter(seed=1, r=4, target_modules=["q_proj"])
    attacks = [
        AdapterRef(f"attack-{i}", publish(source.root, *read_files(unfit), "x").sha256, "a")
        for i in range(15)  # one adapter, fifteen versions of it
    ]
    victim = AdapterRef("victim", publish(source.root, *read_files(fit), "x").sha256, "b")
    cache = _narrow_cache(tmp_path, source)
    kv_cache = BlockManager(16, 4)
    scheduler = Scheduler(
        max_num_seqs=4, max_num_batched_tokens=64, kv_cache=kv_cache, adapters=cache
    )

    def seq(request_id: str, ref: AdapterRef, key: str) -> Sequence:
        return Sequence(request_id, [1, 2, 3], SamplingParams(), 8, key, 0, ref)

    try:
        for i, ref in enumerate(attacks):
            scheduler.add(seq(f"attack-{i}", ref, "a"))
        for _ in range(10_000):
            cache.poll()
            assert scheduler.schedule() == []
            if len(scheduler.failed) == len(attacks):
                break
            time.sleep(0.001)
        assert all(isinstance(s.error, AdapterLoadError) for s in scheduler.failed)
        assert not scheduler.has_unfinished() and kv_cache.num_used_blocks == 0
        assert cache.stats()["device"]["pinned"] == 0 and cache.stats()["device"]["free"] == 2

        victims = [seq(f"victim-{i}", victim, "b") for i in range(2)]
        for s in victims:
            scheduler.add(s)
        for _ in range(10_000):
            cache.poll()
            if scheduler.schedule():
                break
            time.sleep(0.001)
        assert [s.adapter_slot for s in victims] == [1, 1]
        assert cache.stats()["device"]["pinned"] == 1
        for s in victims:
            scheduler.finish(s, "stop")
        assert cache.stats()["device"]["pinned"] == 0 and kv_cache.num_used_blocks == 0
    finally:
        cache.close()


# -- namespaces: no cross-tenant hits, scoped drops ------------------------------------


def test_same_bytes_in_two_namespaces_are_two_entries(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache()
    mine = AdapterRef("a-v1", refs[0].sha256, "tenant-a")
    theirs = AdapterRef("b-v1", refs[0].sha256, "tenant-b")
    also_mine = AdapterRef("a-v2", refs[0].sha256, "tenant-a")
    slot = wait_slot(cache, mine)
    assert cache.acquire(also_mine) == slot  # a namespace shares its own identical bytes
    assert not cache.is_ready(theirs) and cache.acquire(theirs) is None  # no warm hit
    assert cache.stats()["host"]["hits"] == 0
    assert wait_slot(cache, theirs) != slot
    assert source.fetched == [refs[0].sha256] * 2  # loaded cold, as if never seen
    for ref in (mine, also_mine, theirs):
        cache.release(ref)

    cache.drop(theirs)  # B's delete leaves A's adapter in every tier
    assert cache.is_ready(mine) and not cache.is_ready(theirs)
    assert (cache._disk.root / mine.cache_key).is_dir()
    assert not (cache._disk.root / theirs.cache_key).exists()
    assert cache._host.get(mine.cache_key) is not None
    assert cache._host.get(theirs.cache_key) is None


def test_cache_keys_are_hex_whatever_the_namespace(refs: list[AdapterRef]) -> None:
    sha = refs[0].sha256
    keys = {
        AdapterRef("v", sha, namespace).cache_key
        for namespace in ("tenant-a", "tenant-b", "../../etc", "a\0b", "é" * 256)
    }
    assert len(keys) == 5 and all(len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert AdapterRef("v", sha).cache_key == sha  # the namespace-less layout is kept
    with pytest.raises(ValueError, match="namespace"):
        AdapterRef("v", sha, "x" * 257)


def test_drop_during_a_load_leaves_nothing_behind(
    make_cache: MakeCache, refs: list[AdapterRef], source: CountingSource
) -> None:
    cache = make_cache()
    gate = source.gates[refs[0].sha256] = threading.Event()
    assert cache.acquire(refs[0]) is None
    cache.drop(refs[0])
    gate.set()
    wait_slot(cache, refs[1])  # polls until after the dropped load has finished
    for _ in range(10_000):
        if not cache._orphans:
            break
        cache.poll()
        time.sleep(0.001)
    assert not cache.is_ready(refs[0])
    assert cache._host.get(refs[0].cache_key) is None
    assert not (cache._disk.root / refs[0].cache_key).exists()
