"""The Batch API end to end: a live `loramux serve` (the engine) and real Celery workers on
Redis, sharing one PostgreSQL registry and one store, driven by the openai SDK and the CLI.

The worker-crash test comes last: it kills every worker of the stack, then starts one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from openai.types.chat import ChatCompletion
from sqlalchemy import select

from loramux.db.models import Batch, UsageRecord
from loramux.db.session import make_engine, make_session_factory
from loramux.jobs.embedded import worker_command
from tests.e2e.conftest import LORAMUX, LiveServer
from tests.fixtures.services import fresh_pg_database

BROKER_DB = 12
# Far above what the work takes; reached only when something is broken.
TIMEOUT_S = 150.0
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchStack:
    server: LiveServer
    env: dict[str, str]  # the settings server and workers share
    home: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_logs(self) -> str:
        return "".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.home.glob("worker-*.log"))
        )

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.base_url}/v1", api_key=key, max_retries=0)

    def wait(
        self, client: openai.OpenAI, batch_id: str, until: Callable[[Any], bool] | None = None
    ) -> Any:
        """Poll the batch until ``until(batch)`` (default: a final status) holds."""
        until = until or (lambda b: b.status in FINAL)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            batch = client.batches.retrieve(batch_id)
            if until(batch):
                return batch
            if time.monotonic() > deadline:
                raise AssertionError(f"batch stuck at {batch}:\n{self.worker_logs()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def batch_stack(
    live_server_factory: Callable[[dict[str, str]], LiveServer],
    tiny_llama_dir: Path,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BatchStack]:
    home = tmp_path_factory.mktemp("batch-stack")
    broker = f"{redis_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    with fresh_pg_database() as database_url:
        env = {
            "LORAMUX_MODEL": str(tiny_llama_dir),
            "LORAMUX_DATABASE_URL": database_url,
            "LORAMUX_BROKER_URL": broker,
            "LORAMUX_STORAGE_URL": (home / "storage").as_uri(),
            "LORAMUX_BATCH_LEASE_S": "3",
            "LORAMUX_BATCH_POLL_S": "0.2",
        }
        stack = BatchStack(live_server_factory(env), env, home)
        try:
            yield stack
        finally:
            for process in stack.workers:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


@pytest.fixture(scope="module")
def start_worker(batch_stack: BatchStack) -> Callable[[], subprocess.Popen[bytes]]:
    """Start one more Celery worker (solo pool) pointed at the live server's engine."""

    def start() -> subprocess.Popen[bytes]:
        log_path = batch_stack.home / f"worker-{len(batch_stack.workers)}.log"
        env = {**batch_stack.server.env, "LORAMUX_ENGINE_URL": batch_stack.server.base_url}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=batch_stack.home,
            )  # fmt: skip
        batch_stack.workers.append(process)
        deadline = time.monotonic() + TIMEOUT_S
        while " ready." not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        return process

    return start


@pytest.fixture(scope="module")
def worker(start_worker: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    return start_worker()


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def chat_line(custom_id: str, model: str, content: str, max_tokens: int = 8) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def submit(client: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as data:
        uploaded = client.files.create(file=data, purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def read_output(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_sdk_batch_equals_online_requests(batch_stack, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, key = batch_stack.server.make_tenant("sdk-batch")
    client = batch_stack.sdk(key)
    model = client.models.list().data[0].id
    prompts = ["Hello", "Tell me a story", "What is LoRA?", "Bonjour"]
    lines = [chat_line(f"req-{i}", model, p) for i, p in enumerate(prompts)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", lines))
    assert batch.status == "validating"
    done = batch_stack.wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == 4
    assert done.error_file_id is None and done.completed_at is not None

    outputs = read_output(client, done.output_file_id)
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]
    for out, line in zip(outputs, lines, strict=True):
        assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
        assert set(out["response"]) == {"status_code", "request_id", "body"}
        assert out["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(out["response"]["body"])
        online = client.chat.completions.create(**line["body"])
        assert completion.choices[0].message.content == online.choices[0].message.content
        assert completion.usage == online.usage
    listed = client.batches.list(limit=10)
    assert batch.id in [b.id for b in listed.data]


def test_cli_create_wait_and_get(batch_stack, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, key = batch_stack.server.make_tenant("cli-batch")
    model = batch_stack.sdk(key).models.list().data[0].id
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"c{i}", model, "Hi") for i in range(3)])
    env = {
        **os.environ,
        "LORAMUX_BASE_URL": batch_stack.server.base_url,
        "LORAMUX_API_KEY": key,
    }
    out = tmp_path / "out.jsonl"
    created = subprocess.run(
        [LORAMUX, "batches", "create", str(path), "--wait", "--output", str(out), "--json"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert ": 100% 3/3 requests (3 completed, 0 failed) completed" in created.stderr
    batch = json.loads(created.stdout)
    assert batch["status"] == "completed"
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [
        "c0", "c1", "c2",
    ]  # fmt: skip
    shown = subprocess.run(
        [LORAMUX, "batches", "get", batch["id"]],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert shown.returncode == 0 and f"batch {batch['id']}: completed" in shown.stdout
    assert "3 completed, 0 failed" in shown.stdout
    missing = subprocess.run(
        [LORAMUX, "batches", "get", "batch_nope"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert missing.returncode == 1 and "404" in missing.stderr


def test_interactive_first_token_within_a_few_steps_of_a_running_batch(  # type: ignore[no-untyped-def]
    batch_stack, worker, tmp_path
) -> None:
    _, key = batch_stack.server.make_tenant("ttft")
    client = batch_stack.sdk(key)
    model = client.models.list().data[0].id
    lines = [chat_line(f"r{i}", model, f"line {i}", max_tokens=48) for i in range(200)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", lines))
    batch_stack.wait(client, batch.id, lambda b: b.request_counts.completed >= 1)
    with batch_stack.server.admin() as admin:

        def steps() -> int:
            return int(admin.get("/internal/engine/info").json()["stats"]["num_steps_total"])

        waited = []
        for i in range(5):
            before = steps()
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"quick {i}"}],
                max_tokens=4, temperature=0, stream=True,
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    waited.append(steps() - before)
                    break
            stream.close()
    running = client.batches.retrieve(batch.id)
    assert running.request_counts.completed < 200, "the batch ended before the measurement"
    # Steps counted from the client's send: a loaded host's HTTP hop spans a few fast steps
    # (a C decode step of the tiny model is a few ms), so the bound is on the median; a
    # request queued behind the batch would wait hundreds (most of 200 lines of 48 tokens).
    assert sorted(waited)[len(waited) // 2] <= 8, waited
    assert max(waited) <= 32, waited
    client.batches.cancel(batch.id)
    assert batch_stack.wait(client, batch.id).status == "cancelled"


def billing_keys(database_url: str, batch_id: str) -> list[str]:
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        keys = list(
            session.scalars(
                select(UsageRecord.billing_key).where(
                    UsageRecord.billing_key.like(f"batch:{batch_id}:%")
                )
            )
        )
    engine.dispose()
    return keys


def registry_status(database_url: str, batch_id: str) -> str | None:
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    engine.dispose()
    return status


def test_suspending_the_tenant_stops_its_running_batch(batch_stack, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tenant, key = batch_stack.server.make_tenant("suspended-mid-batch")
    client = batch_stack.sdk(key)
    model = client.models.list().data[0].id
    total = 120
    lines = [chat_line(f"r{i}", model, f"line {i}", max_tokens=16) for i in range(total)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", lines))
    batch_stack.wait(client, batch.id, lambda b: b.request_counts.completed >= 1)
    database_url = batch_stack.env["LORAMUX_DATABASE_URL"]
    with batch_stack.server.admin() as admin:
        path = f"/admin/api/tenants/{tenant['id']}"
        admin.patch(path, json={"status": "suspended"}).raise_for_status()
        billed_at_suspension = len(billing_keys(database_url, batch.id))
        deadline = time.monotonic() + TIMEOUT_S
        while registry_status(database_url, batch.id) not in FINAL:  # the tenant cannot look
            assert time.monotonic() < deadline, batch_stack.worker_logs()
            time.sleep(0.1)
        admin.patch(path, json={"status": "active"}).raise_for_status()
    assert len(billing_keys(database_url, batch.id)) == billed_at_suspension >= 1

    done = client.batches.retrieve(batch.id)
    assert done.status == "failed" and done.failed_at is not None, done
    assert done.errors is not None and [e.code for e in done.errors.data] == ["tenant_suspended"]
    counts = done.request_counts
    assert counts.completed == billed_at_suspension < total
    assert counts.completed + counts.failed == total
    refused = read_output(client, done.error_file_id)
    assert len(refused) == counts.failed
    assert {r["error"]["code"] for r in refused} == {"tenant_suspended"}
    assert {r["response"]["status_code"] for r in refused} == {403}


def test_worker_killed_mid_batch_resumes_exactly_once(  # type: ignore[no-untyped-def]
    batch_stack, start_worker, tmp_path
) -> None:
    _, key = batch_stack.server.make_tenant("crash")
    client = batch_stack.sdk(key)
    model = client.models.list().data[0].id
    total = 60
    lines = [chat_line(f"r{i}", model, f"line {i}", max_tokens=8 + i % 40) for i in range(total)]
    if not any(p.poll() is None for p in batch_stack.workers):
        start_worker()
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", lines))
    midway = batch_stack.wait(client, batch.id, lambda b: b.request_counts.completed >= 1)
    for process in batch_stack.workers:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    at_kill = client.batches.retrieve(batch.id)
    assert midway.status == at_kill.status == "in_progress"
    assert 1 <= at_kill.request_counts.completed < total, at_kill.request_counts

    start_worker()
    done = batch_stack.wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == total and done.request_counts.failed == 0
    custom_ids = [o["custom_id"] for o in read_output(client, done.output_file_id)]
    assert custom_ids == [f"r{i}" for i in range(total)]  # each exactly once, in order

    keys = billing_keys(batch_stack.env["LORAMUX_DATABASE_URL"], batch.id)
    assert sorted(keys) == sorted(f"batch:{batch.id}:r{i}" for i in range(total))
