"""How `loramux serve` ends: its embedded beat never outlives it, and a stream still running
when the shutdown grace runs out ends with an in-band error, billed for what it sent."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from loramux.db.models import UsageRecord
from loramux.db.session import make_engine, make_session_factory
from tests.e2e.conftest import start_server
from tests.e2e.test_serve_lifecycle import alive, children_of
from tests.fixtures.services import fresh_pg_database

WAIT_S = 60.0


def descendants(pid: int) -> list[int]:
    found = children_of(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_beat_dies_with_the_server_even_while_the_worker_is_wedged(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    server = start_server(tmp_path, {"LORAMUX_MODEL": str(tiny_llama_dir)})  # embedded worker
    pid = server.process.pid
    # The worker and beat: both up (the worker may start beat late, as --beat did).
    wait_until(lambda: len(descendants(pid)) >= 2, "the worker and beat never both started")
    workers = [p for p in children_of(pid) if " worker " in cmdline(p)]
    others = [p for p in descendants(pid) if p not in workers]
    assert workers and others, [cmdline(p) for p in descendants(pid)]
    try:
        # A worker busy with a long task, or stuck in a call, cannot stop anything: beat
        # must still go with the server, or it keeps scheduling tasks for nobody.
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=WAIT_S)
        wait_until(lambda: not any(alive(p) for p in others), "beat outlived the server")
        for worker in workers:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: not any(alive(p) for p in workers), "the worker outlived the server")
    finally:
        for leftover in workers + others:
            if alive(leftover):
                os.kill(leftover, signal.SIGCONT)
                os.kill(leftover, signal.SIGKILL)


def test_a_stream_past_the_shutdown_grace_ends_in_band_and_is_billed(
    tmp_path: Path, make_tiny_llama: Callable[..., Path]
) -> None:
    # A long context, so a greedy stream runs far longer than the grace.
    model = make_tiny_llama(max_position_embeddings=4096)
    with fresh_pg_database() as database_url:
        server = start_server(
            tmp_path,
            {
                "LORAMUX_MODEL": str(model),
                "LORAMUX_DATABASE_URL": database_url,
                "LORAMUX_SHUTDOWN_GRACE_S": "1",
            },
        )
        try:
            _, key = server.make_tenant("acme")
            chunks = stream_through_shutdown(server.base_url, key, model.name, server.process.pid)
            server.process.wait(timeout=WAIT_S)
        finally:
            if server.process.poll() is None:
                server.process.kill()
        *tokens, last = chunks
        assert tokens and "error" not in tokens[-1], "nothing streamed before the error"
        assert last["error"]["code"] == "server_shutting_down", last
        assert set(last["error"]) == {"message", "type", "param", "code"}
        received = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in tokens)

        engine = make_engine(database_url)
        try:
            with make_session_factory(engine)() as session:
                record = session.scalars(
                    select(UsageRecord).where(UsageRecord.request_id == tokens[0]["id"])
                ).one()
        finally:
            engine.dispose()
        assert record.status == "error"
        assert record.completion_tokens == received


def stream_through_shutdown(base_url: str, key: str, model: str, pid: int) -> list[Any]:
    """A long greedy stream; SIGTERM to the server once it is under way; every event."""
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "temperature": 0,
        "logprobs": 0,
        "stream": True,
    }
    chunks: list[Any] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{base_url}/v1/completions", json=body, headers=headers, timeout=WAIT_S
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            assert line != "data: [DONE]", "the stream finished before the grace ran out"
            chunks.append(json.loads(line[len("data: ") :]))
            if len(chunks) == 5:
                os.kill(pid, signal.SIGTERM)
    return chunks
