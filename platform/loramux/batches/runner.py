"""Runs one batch: validate its file, run the lines not yet staged, then finalize.

Lines run concurrently, bounded so interactive traffic always finds free running slots in
the engine. Between lines a watcher renews the lease and reads the batch's status: a
cancel or the end of the completion window stops new lines and aborts those in flight.
A run that finds another live worker's lease leaves the batch alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from anyio import to_thread
from sqlalchemy.orm import Session, sessionmaker

from loramux.batches.files import unix
from loramux.batches.finalize import finalize, start_finalizing
from loramux.batches.jsonl import InputLine, parse_lines
from loramux.batches.line import run_line
from loramux.batches.staging import (
    LineResult,
    claim_lease,
    move_status,
    release_lease,
    renew_lease,
    stage_line,
    staged_indices,
)
from loramux.db.models import Batch, File
from loramux.db.session import transaction
from loramux.errors import APIError
from loramux.state import AppState

TERMINAL = ("completed", "failed", "expired", "cancelled")


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
        if outcome is None and self.expired:
            outcome = "expired"
            await self._stage_expired(batch, lines)
        if outcome is None:
            outcome = await to_thread.run_sync(start_finalizing, self.sessions, batch.id)
        await to_thread.run_sync(finalize, self.sessions, self.app_state.storage, batch, outcome)
        return (await to_thread.run_sync(self._load)).status

    async def _execute(self, batch: Batch, lines: list[InputLine]) -> None:
        done = await to_thread.run_sync(self._staged, batch.id)
        pending = iter([line for line in lines if line.index not in done])
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(batch, stop))
        workers = [
            asyncio.create_task(self._work(batch, pending, stop))
            for _ in range(self.settings.resolved_batch_max_in_flight)
        ]
        await asyncio.gather(*workers)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    def _staged(self, batch_id: str) -> set[int]:
        with self.sessions() as session:
            return staged_indices(session, batch_id)

    async def _work(self, batch: Batch, pending: Iterator[InputLine], stop: asyncio.Event) -> None:
        for line in pending:  # shared by all workers: each line is taken once
            if stop.is_set():
                return
            try:
                result = await run_line(
                    self.app_state, line, tenant_id=batch.tenant_id,
                    api_key_id=batch.api_key_id, stop=stop,
                )  # fmt: skip
                if result is None:
                    return
                await to_thread.run_sync(stage_line, self.sessions, batch, result)
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
            if expires_at is not None and datetime.now(UTC).timestamp() >= expires_at:
                self.expired = True
                stop.set()
                return

    async def _stage_expired(self, batch: Batch, lines: list[InputLine]) -> None:
        done = await to_thread.run_sync(self._staged, batch.id)
        error: dict[str, Any] = {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
        for line in lines:
            if line.index not in done:
                result = LineResult(line.index, line.custom_id, None, None, None, error)
                await to_thread.run_sync(stage_line, self.sessions, batch, result)
