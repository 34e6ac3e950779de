"""Reservations of contiguous KV cache rows.

Each sequence reserves one contiguous run of rows for its prompt plus the tokens
it may generate, so attention reads its keys as a view (no gather). Free runs are
kept sorted and merged on release; a sequence that does not fit waits.
"""

from __future__ import annotations

import bisect

from loramux_engine.engine.sequence import Sequence


class KVCacheManager:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.num_used_rows = 0
        self._free: list[tuple[int, int]] = [(0, num_rows)]  # sorted (start, length)

    def _find(self, num_rows: int) -> int:
        for i, (_, length) in enumerate(self._free):
            if length >= num_rows:
                return i
        return -1

    def can_allocate(self, seq: Sequence) -> bool:
        return self._find(seq.max_len) >= 0

    def allocate(self, seq: Sequence) -> None:
        i = self._find(seq.max_len)
        if i < 0:
            raise RuntimeError("allocate called without can_allocate")
        start, length = self._free[i]
        if length == seq.max_len:
            del self._free[i]
        else:
            self._free[i] = (start + seq.max_len, length - seq.max_len)
        seq.kv_start = start
        self.num_used_rows += seq.max_len

    def deallocate(self, seq: Sequence) -> None:
        if seq.kv_start < 0:
            return
        start, length = seq.kv_start, seq.max_len
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and start + length == self._free[i][0]:
            length += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            start, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            self._free.pop(i)
        self._free.insert(i, (start, length))
        self.num_used_rows -= seq.max_len
        seq.kv_start = -1

    @property
    def usage(self) -> float:
        return self.num_used_rows / self.num_rows
