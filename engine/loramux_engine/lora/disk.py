"""The local disk tier: adapters by cache key in one directory, LRU-evicted to a byte budget.

Layout: <root>/<key>/{adapter_config.json, adapter_model.safetensors}, where key is
AdapterRef.cache_key: 64 hex characters derived from (namespace, sha256), never a path.
Fetches land in <root>/.staging/ and are renamed into place, so a reader never sees half
an adapter.
Called from the cache's loader threads and, for `remove`, the engine thread.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from loramux_engine.lora.adapter import CONFIG_NAME, WEIGHTS_NAME

_KEY_DIR = re.compile(r"[0-9a-f]{64}")


def _checked(key: str) -> str:
    # Keys come from AdapterRef.cache_key; this keeps any other string from naming a path.
    if not _KEY_DIR.fullmatch(key):
        raise ValueError("an adapter cache key must be 64 lowercase hex characters")
    return key


def _dir_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


class DiskTier:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.evictions = 0
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / ".staging", ignore_errors=True)
        found = [
            path
            for path in root.iterdir()
            if _KEY_DIR.fullmatch(path.name)
            and (path / CONFIG_NAME).is_file()
            and (path / WEIGHTS_NAME).is_file()
        ]
        # Least recently used first: reads touch the directory's mtime.
        for path in sorted(found, key=lambda p: p.stat().st_mtime):
            self._sizes[path.name] = _dir_bytes(path)
        self._evict()

    @property
    def num_bytes(self) -> int:
        return sum(self._sizes.values())

    def read(self, key: str) -> tuple[bytes, bytes] | None:
        """The adapter's (config, weights) bytes, or None when it is not on disk."""
        # Read under the lock so a concurrent commit cannot evict the files mid-read.
        with self._lock:
            if key not in self._sizes:
                return None
            self._sizes.move_to_end(key)
            path = self.root / key
            os.utime(path)
            return (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()

    def staging_dir(self) -> Path:
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit(self, key: str, staging: Path) -> None:
        """Move a verified staging directory into place and evict down to the budget."""
        target = self.root / _checked(key)
        with self._lock:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            self._sizes[key] = _dir_bytes(target)
            self._sizes.move_to_end(key)
            self._evict()

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def remove(self, key: str) -> None:
        with self._lock:
            self._sizes.pop(key, None)
            shutil.rmtree(self.root / _checked(key), ignore_errors=True)

    def _evict(self) -> None:
        # An adapter larger than the whole budget goes too: it is served from memory.
        while self._sizes and sum(self._sizes.values()) > self.budget_bytes:
            victim = next(iter(self._sizes))
            self._sizes.pop(victim)
            shutil.rmtree(self.root / victim, ignore_errors=True)
            self.evictions += 1
