"""The local disk tier: adapters by sha256 under one directory, LRU-evicted to a byte budget.

Layout: <root>/<sha256>/{adapter_config.json, adapter_model.safetensors}. Fetches land in
<root>/.staging/ and are renamed into place, so a reader never sees half an adapter.
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

_SHA256_DIR = re.compile(r"[0-9a-f]{64}")


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
            if _SHA256_DIR.fullmatch(path.name)
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

    def read(self, sha256: str) -> tuple[bytes, bytes] | None:
        """The adapter's (config, weights) bytes, or None when it is not on disk."""
        # Read under the lock so a concurrent commit cannot evict the files mid-read.
        with self._lock:
            if sha256 not in self._sizes:
                return None
            self._sizes.move_to_end(sha256)
            path = self.root / sha256
            os.utime(path)
            return (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()

    def staging_dir(self) -> Path:
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit(self, sha256: str, staging: Path) -> None:
        """Move a verified staging directory into place and evict down to the budget."""
        target = self.root / sha256
        with self._lock:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            self._sizes[sha256] = _dir_bytes(target)
            self._sizes.move_to_end(sha256)
            self._evict()

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def remove(self, sha256: str) -> None:
        with self._lock:
            self._sizes.pop(sha256, None)
            shutil.rmtree(self.root / sha256, ignore_errors=True)

    def _evict(self) -> None:
        # An adapter larger than the whole budget goes too: it is served from memory.
        while self._sizes and sum(self._sizes.values()) > self.budget_bytes:
            victim = next(iter(self._sizes))
            self._sizes.pop(victim)
            shutil.rmtree(self.root / victim, ignore_errors=True)
            self.evictions += 1
