"""Runs one batch: validate its file, run the lines not yet staged, then finalize.

Lines run concurrently, bounded in choices (engine sequences) so interactive traffic always
finds free running slots in the engine. Between lines a watcher renews the lease and reads
the batch's status: a cancel or the end of the completion window stops new lines and aborts
those in flight. A suspended tenant or a revoked or expired key does the same, seen by the
check before each line's admission or by the watcher; the lines left are then recorded as
refused and the batch fails. A run that finds another live worker's lease leaves it alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from anyio import to_thread
from sqlalchemy.orm import Session, sessionmaker

from loramux import telemetry
from loramux.batches.budget import ChoiceBudget
from loramux.batches.files import unix
from loramux.batches.finalize import finalize, start_finalizing
from loramux.batches.jsonl import InputLine, parse_lines
from loramux.batches.line import error_result, run_line
from loramux.batches.staging import (
    LineResult,
    claim_lease,
    move_status,
    release_lease,
    renew_lease,
    stage_line,
    staged_indices,
)
from loramux.batches.standing import StandingRevoked, check_standing_now
from loramux.db.models import Batch, File
from loramux.db.session import transaction
from loramux.errors import APIError
from loramux.state import AppState

TERMINAL = ("completed", "failed", "expired", "cancelled")
EXPIRED_ERROR: dict[str, Any] = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _expired(line: InputLine) -> LineResult:
    return LineResult(line.index, line.custom_id, None, None, None, EXPIRED_ERROR)


class BatchRunner:
    def __init__(self, app_state: AppState, batch_id: str, owner: str) -> None:
        self.app_state = app_state
        self.sessions: sessionmaker[Session] = app_state.sessions
        self.settings = app_state.settings
        self.batch_id = batch_id
        self.owner = owner
        self.cancel_requested = False
        self.expired = False
        self.lease_lost = False
        self.failure: BaseException | None = None
        self.refusal: APIError | None = None  # why the batch may run no more lines

    async def run(self) -> str:
        """The batch's status when this run ends; ``busy`` if another live worker holds it."""
        lease_s = self.settings.batch_lease_s
        if not await to_thread.run_sync(
            claim_lease, self.sessions, self.batch_id, self.owner, lease_s
        ):
            status = (await to_thread.run_sync(self._load)).status
            return status if status in TERMINAL else "busy"
        try:
            return await self._run()
        finally:
            await to_thread.run_sync(release_lease, self.sessions, self.batch_id, self.owner)

    def _load(self) -> Batch:
        with self.sessions() as session:
            batch = session.get(Batch, self.batch_id)
            assert batch is not None
            return batch

    def _read_lines(self, batch: Batch) -> list[InputLine]:
        with self.sessions() as session:
            input_file = session.get(File, batch.input_file_id)
        if input_file is None:
            raise APIError(f"the input file {batch.input_file_id} no longer exists")
        data = self.app_state.storage.get_bytes(
            input_file.storage_key, expected_sha256=input_file.sha256
        )
        lines = list(parse_lines(data.splitlines(), max_lines=self.settings.batch_max_lines))
        for line in lines:
            if line.url != batch.endpoint:
                raise APIError(
                    f"line {line.number}: url {line.url} does not match the batch's endpoint "
                    f"{batch.endpoint}",
                    code="mismatched_endpoint",
                )
        return lines

    def _validate(self, batch: Batch) -> list[InputLine] | None:
        """The file's lines, with the batch moved to in_progress; None if it failed."""
        try:
            lines = self._read_lines(batch)
        except APIError as error:
            now = datetime.now(UTC)
            failure = {"code": error.code or "invalid_batch_file", "message": error.message}
            with transaction(self.sessions) as session:
                move_status(
                    session, batch.id, ("validating", "in_progress"), status="failed",
                    failed_at=now, errors={"object": "list", "data": [failure]},
                )  # fmt: skip
            return None
        if batch.status == "validating":
            with transaction(self.sessions) as session:
                move_status(
                    session, batch.id, ("validating",), status="in_progress",
                    in_progress_at=datetime.now(UTC), total=len(lines),
                )  # fmt: skip
        return lines

    async def _run(self) -> str:
        batch = await to_thread.run_sync(self._load)
        if batch.status in TERMINAL:
            return batch.status
        lines: list[InputLine] = []
        if batch.status in ("validating", "in_progress"):
            validated = await to_thread.run_sync(self._validate, batch)
            if validated is None:
                return "failed"
            lines = validated
            batch = await to_thread.run_sync(self._load)
        if batch.status == "in_progress":
            await self._execute(batch, lines)
            if self.lease_lost:
                return "lost"
            if self.failure is not None:
                raise self.failure
        outcome = "cancelled" if batch.status == "cancelling" or self.cancel_requested else None
        errors: list[dict[str, Any]] | None = None
        if outcome is None and self.refusal is not None:
            outcome, refusal = "failed", self.refusal
            await self._stage_unrun(batch, lines, lambda line: error_result(line, refusal, None))
            errors = [
                {"code": refusal.code, "message": refusal.message, "param": None, "line": None}
            ]
        if outcome is None and self.expired:
            outcome = "expired"
            await self._stage_unrun(batch, lines, _expired)
        if outcome is None:
            outcome = await to_thread.run_sync(start_finalizing, self.sessions, batch.id)
        await to_thread.run_sync(
            finalize, self.sessions, self.app_state.storage, batch, outcome, errors
        )
        return (await to_thread.run_sync(self._load)).status

    async def _execute(self, batch: Batch, lines: list[InputLine]) -> None:
        done = await to_thread.run_sync(self._staged, batch.id)
        pending = iter([line for line in lines if line.index not in done])
        stop = asyncio.Event()
        budget = ChoiceBudget(self.settings.resolved_batch_max_in_flight)
        watcher = asyncio.create_task(self._watch(batch, stop))
        workers = [
            asyncio.create_task(self._work(batch, pending, stop, budget))
            for _ in range(self.settings.resolved_batch_max_in_flight)
        ]
        await asyncio.gather(*workers)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    def _staged(self, batch_id: str) -> set[int]:
        with self.sessions() as session:
            return staged_indices(session, batch_id)

    @asynccontextmanager
    async def _gate(
        self, batch: Batch, budget: ChoiceBudget, num_choices: int
    ) -> AsyncIterator[None]:
        """A line's room in the engine, then its tenant's and key's standing, in that order:
        the wait for room may be long, and the standing must hold when the line goes in."""
        async with budget.hold(num_choices):
            await to_thread.run_sync(
                check_standing_now, self.sessions, batch.tenant_id, batch.api_key_id
            )
            yield

    async def _work(
        self, batch: Batch, pending: Iterator[InputLine], stop: asyncio.Event, budget: ChoiceBudget
    ) -> None:
        for line in pending:  # shared by all workers: each line is taken once
            if stop.is_set():
                return
            try:
                with telemetry.tracer().start_as_current_span(
                    "loramux.batch.line",
                    attributes={"loramux.batch_id": batch.id, "loramux.line": line.index},
                    record_exception=False,
                ) as span:
                    result = await run_line(
                        self.app_state, line, tenant_id=batch.tenant_id,
                        api_key_id=batch.api_key_id, stop=stop,
                        gate=lambda num_choices: self._gate(batch, budget, num_choices),
                    )  # fmt: skip
                    if result is None:
                        return
                    span.set_attribute("loramux.status_code", result.status_code or 0)
                    await to_thread.run_sync(stage_line, self.sessions, batch, result)
            except StandingRevoked as revoked:  # this line and the ones left are refused
                self.refusal = self.refusal or revoked.error
                stop.set()
                return
            except Exception as error:  # transient (engine server or registry down): retry later
                self.failure = self.failure or error
                stop.set()
                return

    async def _watch(self, batch: Batch, stop: asyncio.Event) -> None:
        """Renew the lease and look for a cancel or the window's end, every poll interval."""
        lease_s, poll_s = self.settings.batch_lease_s, self.settings.batch_poll_s
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        expires_at = unix(batch.expires_at)
        while True:
            await asyncio.sleep(poll_s)
            if loop.time() - renewed_at >= lease_s / 3:
                if not await to_thread.run_sync(
                    renew_lease, self.sessions, batch.id, self.owner, lease_s
                ):
                    self.lease_lost = True
                    stop.set()
                    return
                renewed_at = loop.time()
            status = (await to_thread.run_sync(self._load)).status
            if status == "cancelling":
                self.cancel_requested = True
                stop.set()
                return
            try:  # aborts the lines in flight too: a suspension stops long lines at once
                await to_thread.run_sync(
                    check_standing_now, self.sessions, batch.tenant_id, batch.api_key_id
                )
            except StandingRevoked as revoked:
                self.refusal = self.refusal or revoked.error
                stop.set()
                return
            if expires_at is not None and datetime.now(UTC).timestamp() >= expires_at:
                self.expired = True
                stop.set()
                return

    async def _stage_unrun(
        self, batch: Batch, lines: list[InputLine], result: Callable[[InputLine], LineResult]
    ) -> None:
        """Record each line not staged yet as ``result(line)``, an error."""
        done = await to_thread.run_sync(self._staged, batch.id)
        for line in lines:
            if line.index not in done:
                await to_thread.run_sync(stage_line, self.sessions, batch, result(line))
