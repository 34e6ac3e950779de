"""The adapter cache: device slots <- host memory LRU <- local disk <- AdapterSource.

Every tier is bounded in bytes (the device tier by its preallocated pool, see
LoRASlotPool.slots_for_budget). Every tier is keyed by AdapterRef.cache_key, derived from
the ref's namespace (the platform's tenant) and its sha256: one content referenced twice
within a namespace is held once, but never shared across namespaces, so a load is never a
warm hit that tells one tenant what another has in use, and a drop in one namespace never
evicts another's. The engine thread calls everything public; loader threads fetch,
verify (see ref.adapter_sha256) and parse cold adapters into the host tier, and `poll`
then writes finished loads into device slots between steps. An adapter pinned by a
running request (acquire .. release) is never evicted from its slot, and a slot is
returned on every path, a failed write into the pool included.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loramux_engine.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, LoRAAdapter, parse_adapter
from loramux_engine.lora.disk import DiskTier
from loramux_engine.lora.errors import AdapterIntegrityError, AdapterLoadError
from loramux_engine.lora.host import HostTier
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.ref import AdapterRef, adapter_sha256
from loramux_engine.lora.source import AdapterSource


@dataclass(slots=True)
class TierStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    def __init__(
        self,
        pool: LoRASlotPool,
        source: AdapterSource,
        *,
        host_budget_bytes: int,
        disk_dir: Path,
        disk_budget_bytes: int,
        failure_ttl_s: float = 30.0,
        num_loader_threads: int = 2,
    ) -> None:
        self.pool = pool
        self.source = source
        self.failure_ttl_s = failure_ttl_s
        self._host = HostTier(host_budget_bytes)
        self._disk = DiskTier(disk_dir, disk_budget_bytes)
        self._stats = {tier: TierStats() for tier in ("device", "host", "disk")}
        self._stats_lock = threading.Lock()
        # More than one loader so that one slow fetch does not hold up every other cold load.
        self._loader = ThreadPoolExecutor(num_loader_threads, thread_name_prefix="lora-loader")
        # Engine-thread state, keyed by AdapterRef.cache_key.
        self._slots: OrderedDict[str, int] = OrderedDict()  # resident, least recent first
        self._resident: dict[str, AdapterRef] = {}  # what each slot's key stands for
        self._free_slots = list(range(pool.num_slots - 1, 0, -1))
        self._pins: dict[str, int] = {}
        self._loading: dict[str, tuple[AdapterRef, Future[LoRAAdapter]]] = {}
        self._staged: dict[str, tuple[AdapterRef, LoRAAdapter]] = {}  # loaded, awaiting a slot
        self._failed: dict[str, tuple[AdapterLoadError, float]] = {}
        self._dropped: set[str] = set()  # dropped while pinned: cleared on last release
        # Loads in flight when their adapter was dropped: what they leave in the host and
        # disk tiers is removed once they finish.
        self._orphans: dict[str, Future[LoRAAdapter]] = {}

    # -- engine thread -------------------------------------------------------------

    def is_ready(self, ref: AdapterRef) -> bool:
        return ref.cache_key in self._slots

    def can_admit(self, ref: AdapterRef) -> bool:
        """False only when the adapter is not resident and every slot is pinned."""
        return ref.cache_key in self._slots or self._has_slot()

    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin the adapter and return its slot, or None while it loads (a load is started).

        Raises AdapterLoadError when its last load failed (less than failure_ttl_s ago),
        or when writing it into a slot fails now (the slot stays free for others).
        """
        key = ref.cache_key
        slot = self._slots.get(key)
        if slot is None:
            self._raise_if_failed(key)
            if key not in self._staged and key not in self._loading:
                self._count("device", misses=1)
                adapter = self._host.get(key)
                if adapter is None:
                    self._loading[key] = (ref, self._loader.submit(self._load, ref))
                    return None
                self._count("host", hits=1)
                self._staged[key] = (ref, adapter)
            if key not in self._staged or not self._place(key):
                return None
            slot = self._slots[key]
        else:
            self._count("device", hits=1)
            self._slots.move_to_end(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        return slot

    def release(self, ref: AdapterRef) -> None:
        key = ref.cache_key
        pins = self._pins.get(key, 0) - 1
        if pins < 0:
            raise ValueError(f"release of adapter {ref.id} without a matching acquire")
        if pins:
            self._pins[key] = pins
            return
        del self._pins[key]
        if key in self._dropped:
            self._dropped.discard(key)
            self._evict_slot(key)

    def poll(self) -> list[tuple[AdapterRef, AdapterLoadError]]:
        """Finish loads: write loaded adapters into free slots; return the new failures."""
        failures = []
        for key, (ref, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            try:
                self._staged[key] = (ref, future.result())
            except Exception as cause:
                error = AdapterLoadError(ref.id, cause)
                self._failed[key] = (error, time.monotonic())
                failures.append((ref, error))
        for key, future in list(self._orphans.items()):
            if future.done():
                del self._orphans[key]
                if key not in self._loading and key not in self._staged:
                    self._host.pop(key)
                    self._disk.remove(key)
        self._expire_failures()
        # Place no more than the slots free or unpinned now, so that placing one staged
        # adapter never evicts another placed by this same poll before its request pins it.
        room = len(self._free_slots) + sum(key not in self._pins for key in self._slots)
        for key in list(self._staged)[:room]:
            ref = self._staged[key][0]
            try:
                self._place(key)
            except AdapterLoadError as error:
                failures.append((ref, error))
        return failures

    def wait_for_load(self, timeout_s: float) -> None:
        """Block until a load in flight finishes (or timeout_s): for an engine with no work."""
        futures = [future for _, future in self._loading.values()]
        if futures:
            wait(futures, timeout_s, return_when=FIRST_COMPLETED)

    def drop(self, ref: AdapterRef) -> None:
        """Forget a deleted adapter in every tier (its slot is cleared once unpinned)."""
        key = ref.cache_key
        loading = self._loading.pop(key, None)
        if loading is not None:  # it finishes, but nothing places it, and poll forgets it
            self._orphans[key] = loading[1]
        self._staged.pop(key, None)
        self._failed.pop(key, None)
        self._host.pop(key)
        self._disk.remove(key)
        if key in self._pins:
            self._dropped.add(key)
        elif key in self._slots:
            self._evict_slot(key)

    def stats(self) -> dict[str, dict[str, float]]:
        with self._stats_lock:
            tiers: dict[str, dict[str, float]] = {t: asdict(s) for t, s in self._stats.items()}
        tiers["host"]["evictions"] = self._host.evictions
        tiers["disk"]["evictions"] = self._disk.evictions
        tiers["device"].update(
            num_slots=self.pool.num_slots - 1,
            resident=len(self._slots),
            pinned=len(self._pins),
            free=len(self._free_slots),
        )
        tiers["host"].update(bytes=self._host.num_bytes, budget_bytes=self._host.budget_bytes)
        tiers["disk"].update(bytes=self._disk.num_bytes, budget_bytes=self._disk.budget_bytes)
        return tiers

    def residents(self) -> list[dict[str, Any]]:
        """The adapter in each device slot, by slot (read from any thread: a snapshot)."""
        slots, refs, pins = list(self._slots.items()), dict(self._resident), set(self._pins)
        return [
            {"slot": slot, "id": ref.id, "namespace": ref.namespace, "pinned": key in pins}
            for key, slot in sorted(slots, key=lambda item: item[1])
            if (ref := refs.get(key)) is not None
        ]

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _raise_if_failed(self, key: str) -> None:
        failed = self._failed.get(key)
        if failed is None:
            return
        error, at = failed
        if time.monotonic() - at < self.failure_ttl_s:
            raise error
        del self._failed[key]

    def _expire_failures(self) -> None:
        # Failures of adapters nobody asks for again would otherwise stay forever.
        now = time.monotonic()
        for key, (_, at) in list(self._failed.items()):
            if now - at >= self.failure_ttl_s:
                del self._failed[key]

    def _has_slot(self) -> bool:
        return bool(self._free_slots) or any(key not in self._pins for key in self._slots)

    def _place(self, key: str) -> bool:
        """Write a staged adapter into a free or least recently used unpinned slot.

        When the write fails the slot goes back to the free list (pool.load leaves it
        zeroed) and the adapter fails with AdapterLoadError, raised here and again at its
        requests' admission until failure_ttl_s has passed.
        """
        if not self._has_slot():
            return False
        if not self._free_slots:
            victim = next(key for key in self._slots if key not in self._pins)
            self._evict_slot(victim)
        ref, adapter = self._staged.pop(key)
        slot = self._free_slots.pop()
        start = time.perf_counter()
        try:
            self.pool.load(slot, adapter)
        except Exception as cause:
            self._free_slots.append(slot)
            self._host.pop(key)  # a later retry parses it again rather than reuse this copy
            error = AdapterLoadError(ref.id, cause)
            self._failed[key] = (error, time.monotonic())
            raise error from cause
        self._count("device", loads=1, load_seconds=time.perf_counter() - start)
        self._slots[key] = slot
        self._resident[key] = ref
        return True

    def _evict_slot(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._resident.pop(key, None)
        try:
            self.pool.clear(slot)
        finally:
            self._free_slots.append(slot)
        self._count("device", evictions=1)

    def _count(self, tier: str, **deltas: float) -> None:
        with self._stats_lock:
            stats = self._stats[tier]
            for name, delta in deltas.items():
                setattr(stats, name, getattr(stats, name) + delta)

    # -- loader threads ------------------------------------------------------------

    def _load(self, ref: AdapterRef) -> LoRAAdapter:
        key = ref.cache_key
        adapter = self._host.get(key)
        if adapter is not None:
            self._count("host", hits=1)
            return adapter
        self._count("host", misses=1)
        files = self._disk.read(key)
        if files is not None:
            # Only verified content is ever committed to disk, so a hit is not re-hashed.
            self._count("disk", hits=1)
            return self._parse(key, files)
        self._count("disk", misses=1)
        start = time.perf_counter()
        staging = self._disk.staging_dir()
        try:
            self.source.fetch(ref, staging)
            files = (staging / CONFIG_NAME).read_bytes(), (staging / WEIGHTS_NAME).read_bytes()
            if adapter_sha256(*files) != ref.sha256:
                raise AdapterIntegrityError(
                    f"content does not match sha256 {ref.sha256}; the adapter was refused"
                )
            self._count("disk", loads=1, load_seconds=time.perf_counter() - start)
            adapter = self._parse(key, files)
        except BaseException:
            self._disk.discard(staging)
            raise
        self._disk.commit(key, staging)
        return adapter

    def _parse(self, key: str, files: tuple[bytes, bytes]) -> LoRAAdapter:
        start = time.perf_counter()
        adapter = parse_adapter(files[0], files[1], self.pool.shape, self.pool.max_rank)
        self._host.put(key, adapter)
        self._count("host", loads=1, load_seconds=time.perf_counter() - start)
        return adapter
