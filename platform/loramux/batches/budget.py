"""How much of the engine a running batch may hold, counted in choices.

A line of P prompts with ``n`` choices is P x n engine sequences, exactly as the same request
made online is: the batch's bound (``batch_max_in_flight``) counts those, not lines, so a
few wide lines cannot fill the engine's running slots that interactive traffic needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ChoiceBudget:
    def __init__(self, max_choices: int) -> None:
        self.max_choices = max(1, max_choices)
        self._free = asyncio.Semaphore(self.max_choices)
        # One taker at a time: two wide lines each holding part of the budget and waiting
        # for the rest would never run; lines also take it in the order they came.
        self._taking = asyncio.Lock()

    @asynccontextmanager
    async def hold(self, num_choices: int) -> AsyncIterator[None]:
        """Hold ``num_choices`` (at most the whole budget: a wider line runs alone)."""
        need = min(max(1, num_choices), self.max_choices)
        taken = 0
        try:
            async with self._taking:
                while taken < need:
                    await self._free.acquire()
                    taken += 1
            yield
        finally:
            for _ in range(taken):
                self._free.release()
