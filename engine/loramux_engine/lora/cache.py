"""The adapter cache: device slots <- host memory LRU <- local disk <- AdapterSource.

Every tier is bounded in bytes (the device tier by its preallocated pool, see
LoRASlotPool.slots_for_budget). Adapters are keyed by sha256, so one content uploaded
twice is held once. The engine thread calls everything public; loader threads fetch,
verify (see ref.adapter_sha256) and parse cold adapters into the host tier, and `poll`
then writes finished loads into device slots between steps. An adapter pinned by a
running request (acquire .. release) is never evicted from its slot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

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
        # Engine-thread state, keyed by sha256.
        self._slots: OrderedDict[str, int] = OrderedDict()  # resident, least recent first
        self._free_slots = list(range(pool.num_slots - 1, 0, -1))
        self._pins: dict[str, int] = {}
        self._loading: dict[str, tuple[AdapterRef, Future[LoRAAdapter]]] = {}
        self._staged: dict[str, tuple[AdapterRef, LoRAAdapter]] = {}  # loaded, awaiting a slot
        self._failed: dict[str, tuple[AdapterLoadError, float]] = {}
        self._dropped: set[str] = set()  # dropped while pinned: cleared on last release

    # -- engine thread -------------------------------------------------------------

    def is_ready(self, ref: AdapterRef) -> bool:
        return ref.sha256 in self._slots

    def can_admit(self, ref: AdapterRef) -> bool:
        """False only when the adapter is not resident and every slot is pinned."""
        return ref.sha256 in self._slots or self._has_slot()

    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin the adapter and return its slot, or None while it loads (a load is started).

        Raises AdapterLoadError when its last load failed (less than failure_ttl_s ago).
        """
        sha = ref.sha256
        slot = self._slots.get(sha)
        if slot is None:
            self._raise_if_failed(sha)
            if sha not in self._staged and sha not in self._loading:
                self._count("device", misses=1)
                adapter = self._host.get(sha)
                if adapter is None:
                    self._loading[sha] = (ref, self._loader.submit(self._load, ref))
                    return None
                self._count("host", hits=1)
                self._staged[sha] = (ref, adapter)
            if sha not in self._staged or not self._place(sha):
                return None
            slot = self._slots[sha]
        else:
            self._count("device", hits=1)
            self._slots.move_to_end(sha)
        self._pins[sha] = self._pins.get(sha, 0) + 1
        return slot

    def release(self, ref: AdapterRef) -> None:
        sha = ref.sha256
        pins = self._pins.get(sha, 0) - 1
        if pins < 0:
            raise ValueError(f"release of adapter {ref.id} without a matching acquire")
        if pins:
            self._pins[sha] = pins
            return
        del self._pins[sha]
        if sha in self._dropped:
            self._dropped.discard(sha)
            self._evict_slot(sha)

    def poll(self) -> list[tuple[AdapterRef, AdapterLoadError]]:
        """Finish loads: write loaded adapters into free slots; return the new failures."""
        failures = []
        for sha, (ref, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[sha]
            try:
                self._staged[sha] = (ref, future.result())
            except Exception as cause:
                error = AdapterLoadError(ref.id, cause)
                self._failed[sha] = (error, time.monotonic())
                failures.append((ref, error))
        # Place no more than the slots free or unpinned now, so that placing one staged
        # adapter never evicts another placed by this same poll before its request pins it.
        room = len(self._free_slots) + sum(sha not in self._pins for sha in self._slots)
        for sha in list(self._staged)[:room]:
            self._place(sha)
        return failures

    def wait_for_load(self, timeout_s: float) -> None:
        """Block until a load in flight finishes (or timeout_s): for an engine with no work."""
        futures = [future for _, future in self._loading.values()]
        if futures:
            wait(futures, timeout_s, return_when=FIRST_COMPLETED)

    def drop(self, ref: AdapterRef) -> None:
        """Forget a deleted adapter in every tier (its slot is cleared once unpinned)."""
        sha = ref.sha256
        self._loading.pop(sha, None)  # a load in flight finishes, but nothing places it
        self._staged.pop(sha, None)
        self._failed.pop(sha, None)
        self._host.pop(sha)
        self._disk.remove(sha)
        if sha in self._pins:
            self._dropped.add(sha)
        elif sha in self._slots:
            self._evict_slot(sha)

    def stats(self) -> dict[str, dict[str, float]]:
        with self._stats_lock:
            tiers: dict[str, dict[str, float]] = {t: asdict(s) for t, s in self._stats.items()}
        tiers["host"]["evictions"] = self._host.evictions
        tiers["disk"]["evictions"] = self._disk.evictions
        tiers["device"].update(
            num_slots=self.pool.num_slots - 1, resident=len(self._slots), pinned=len(self._pins)
        )
        tiers["host"].update(bytes=self._host.num_bytes, budget_bytes=self._host.budget_bytes)
        tiers["disk"].update(bytes=self._disk.num_bytes, budget_bytes=self._disk.budget_bytes)
        return tiers

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _raise_if_failed(self, sha: str) -> None:
        failed = self._failed.get(sha)
        if failed is None:
            return
        error, at = failed
        if time.monotonic() - at < self.failure_ttl_s:
            raise error
        del self._failed[sha]

    def _has_slot(self) -> bool:
        return bool(self._free_slots) or any(sha not in self._pins for sha in self._slots)

    def _place(self, sha: str) -> bool:
        """Write a staged adapter into a free or least recently used unpinned slot."""
        if not self._has_slot():
            return False
        if not self._free_slots:
            victim = next(sha for sha in self._slots if sha not in self._pins)
            self._evict_slot(victim)
        slot = self._free_slots.pop()
        _, adapter = self._staged.pop(sha)
        start = time.perf_counter()
        self.pool.load(slot, adapter)
        self._count("device", loads=1, load_seconds=time.perf_counter() - start)
        self._slots[sha] = slot
        return True

    def _evict_slot(self, sha: str) -> None:
        slot = self._slots.pop(sha)
        self.pool.clear(slot)
        self._free_slots.append(slot)
        self._count("device", evictions=1)

    def _count(self, tier: str, **deltas: float) -> None:
        with self._stats_lock:
            stats = self._stats[tier]
            for name, delta in deltas.items():
                setattr(stats, name, getattr(stats, name) + delta)

    # -- loader threads ------------------------------------------------------------

    def _load(self, ref: AdapterRef) -> LoRAAdapter:
        adapter = self._host.get(ref.sha256)
        if adapter is not None:
            self._count("host", hits=1)
            return adapter
        self._count("host", misses=1)
        files = self._disk.read(ref.sha256)
        if files is not None:
            # Only verified content is ever committed to disk, so a hit is not re-hashed.
            self._count("disk", hits=1)
            return self._parse(ref, files)
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
            adapter = self._parse(ref, files)
        except BaseException:
            self._disk.discard(staging)
            raise
        self._disk.commit(ref.sha256, staging)
        return adapter

    def _parse(self, ref: AdapterRef, files: tuple[bytes, bytes]) -> LoRAAdapter:
        start = time.perf_counter()
        adapter = parse_adapter(files[0], files[1], self.pool.shape, self.pool.max_rank)
        self._host.put(ref.sha256, adapter)
        self._count("host", loads=1, load_seconds=time.perf_counter() - start)
        return adapter
