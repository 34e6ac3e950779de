"""A local journal of the usage records the registry could not take, replayed until it does.

A request's usage must not be lost with the registry: the client already has its tokens.
When the write fails for a dependency outage, the record (counts and ids, never prompt
text) is appended to ``home/usage-spool.jsonl`` and fsynced before the request is done.
The journal is replayed at start, periodically (``replay_forever`` in the app's lifespan)
and before an admission while it holds records, so that the tokens count against the
monthly quota as soon as the registry is back.

Every record carries a ``billing_key`` (the request id for online requests), unique in the
registry: a replay that inserted a record and crashed before trimming the journal inserts
nothing the second time, so a record is billed exactly once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker

from loramux.errors import dependency_unavailable
from loramux.usage import record_usage

logger = logging.getLogger(__name__)

SPOOL_NAME = "usage-spool.jsonl"
# Lines that can never be written (a deleted tenant, a torn line): kept for an operator.
REJECTED_NAME = "usage-spool.rejected.jsonl"

_spools: dict[Path, UsageSpool] = {}
_spools_lock = threading.Lock()


def spool_for(home: Path) -> UsageSpool:
    """The process's one spool under ``home`` (one thread lock per journal)."""
    with _spools_lock:
        spool = _spools.get(home)
        if spool is None:
            spool = _spools[home] = UsageSpool(home)
        return spool


class UsageSpool:
    def __init__(self, home: Path) -> None:
        self.path = home / SPOOL_NAME
        self.rejected_path = home / REJECTED_NAME
        self._lock_path = home / "usage-spool.lock"
        self._thread_lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Threads of this process, then other processes over the same home (a worker).
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def append(self, record: dict[str, Any]) -> None:
        """Journal one record durably (fsynced) before returning."""
        with self._locked():
            _append_line(self.path, _encode(record))

    def replay(self, sessions: sessionmaker[Session]) -> int:
        """Write every journalled record, each once; returns how many were newly billed.

        Stops at the first outage (raised), keeping that record and the ones after it.
        """
        with self._locked():
            if not self.pending():
                return 0
            lines = self.path.read_bytes().splitlines()
            done = billed = 0
            try:
                for line in lines:
                    billed += self._write(sessions, line)
                    done += 1
            finally:
                self._keep(lines[done:])
            if billed:
                logger.info("usage spool: %d journalled records billed", billed)
            return billed

    def _write(self, sessions: sessionmaker[Session], line: bytes) -> int:
        if not line.strip():
            return 0
        try:
            record = _decode(line)
        except (ValueError, TypeError, KeyError):  # torn by a crash mid-append
            logger.error("usage spool: unreadable line set aside in %s", self.rejected_path)
            _append_line(self.rejected_path, line)
            return 0
        try:
            with sessions() as session:
                billed = record_usage(session, **record)
                session.commit()
        except Exception as error:
            if dependency_unavailable(error) is not None:
                raise  # the registry is away again: keep this line and the rest
            # e.g. the tenant was deleted meanwhile: it can never be written
            logger.exception("usage spool: record %s rejected", record.get("billing_key"))
            _append_line(self.rejected_path, line)
            return 0
        return int(billed)

    def _keep(self, lines: list[bytes]) -> None:
        """Replace the journal by ``lines``, atomically and durably."""
        if not lines:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(b"".join(line + b"\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


async def replay_forever(
    spool: UsageSpool, sessions: sessionmaker[Session], interval_s: float
) -> None:
    """Replay the journal now and every ``interval_s`` while the app runs."""
    while True:
        if spool.pending():
            try:
                await anyio.to_thread.run_sync(spool.replay, sessions)
            except Exception:  # an outage (logged where classified) or a bug: try again later
                logger.warning("usage spool: replay failed; retrying", exc_info=True)
        await anyio.sleep(interval_s)


def _encode(record: dict[str, Any]) -> bytes:
    fields = dict(record)
    if isinstance(fields.get("created_at"), datetime):
        fields["created_at"] = fields["created_at"].isoformat()
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def _decode(line: bytes) -> dict[str, Any]:
    fields = json.loads(line)
    if not isinstance(fields, dict) or not fields["billing_key"]:
        raise ValueError("not a usage record")
    if fields.get("created_at") is not None:
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
    return fields


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        # A line torn by a crash must not swallow this one: start on a line of its own.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        _fsync_dir(path.parent)  # the new file's name is durable too


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
