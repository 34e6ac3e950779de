"""The host memory tier: parsed adapters in an LRU bounded by their bytes.

Keyed by AdapterRef.cache_key. Shared by the loader thread (which fills it) and the engine
thread (which reads it).
"""

from __future__ import annotations

import threading

from cachetools import LRUCache

from loramux_engine.lora.adapter import LoRAAdapter


class _CountingLRU(LRUCache[str, LoRAAdapter]):
    evictions = 0

    def popitem(self) -> tuple[str, LoRAAdapter]:
        self.evictions += 1
        return super().popitem()


def _adapter_bytes(adapter: LoRAAdapter) -> int:
    return adapter.num_bytes


class HostTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._lru = _CountingLRU(maxsize=budget_bytes, getsizeof=_adapter_bytes)

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    @property
    def num_bytes(self) -> int:
        return int(self._lru.currsize)

    def get(self, key: str) -> LoRAAdapter | None:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: str, adapter: LoRAAdapter) -> None:
        # An adapter over the whole budget is not kept here; its load still completes.
        if adapter.num_bytes > self.budget_bytes:
            return
        with self._lock:
            self._lru[key] = adapter

    def pop(self, key: str) -> None:
        with self._lock:
            self._lru.pop(key, None)
