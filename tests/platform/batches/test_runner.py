"""The batch runner in-process: results equal online requests, staged lines are never
run or billed twice, leases, cancellation, quota, validation and expiry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.batches.staging import LineResult, claim_lease, stage_line
from loramux.db.models import Batch, UsageRecord
from tests.platform.batches.conftest import bearer, request_line

COMPLETION = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
CHAT_URL = "/v1/chat/completions"
VOLATILE = ("id", "created")


def model_of(client, key: str) -> str:  # type: ignore[no-untyped-def]
    return str(client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"])


def output_lines(client, key: str, file_id: str | None) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    if file_id is None:
        return []
    content = client.get(f"/v1/files/{file_id}/content", headers=bearer(key))
    assert content.status_code == 200, content.text
    return [json.loads(line) for line in content.text.splitlines()]


def stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE}


def billed(db, batch_id: str) -> list[UsageRecord]:  # type: ignore[no-untyped-def]
    with db() as session:
        query = select(UsageRecord).where(UsageRecord.billing_key.like(f"batch:{batch_id}:%"))
        return list(session.scalars(query))


def test_results_equal_online_requests(client, make_tenant, start_batch, run_batch, db) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = model_of(client, key)
    lines = [
        request_line("first", {"model": model, **COMPLETION}),
        request_line("bad-param", {"model": model, **COMPLETION, "temperature": 5}),
        request_line("second", {"model": model, **COMPLETION, "prompt": "The sea"}),
        request_line("no-model", {**COMPLETION, "model": "nobody-has-this"}),
    ]
    batch = start_batch(key, lines)
    assert run_batch(batch["id"]) == "completed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=bearer(key)).json()
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    for name in ("in_progress_at", "finalizing_at", "completed_at"):
        assert isinstance(done[name], int), name

    outputs = output_lines(client, key, done["output_file_id"])
    assert [o["custom_id"] for o in outputs] == ["first", "second"]
    for out, line in zip(outputs, (lines[0], lines[2]), strict=True):
        assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
        assert out["id"].startswith("batch_req_")
        assert out["response"]["status_code"] == 200 and out["response"]["request_id"]
        online = client.post("/v1/completions", headers=bearer(key), json=line["body"]).json()
        assert stable(out["response"]["body"]) == stable(online)

    errors = output_lines(client, key, done["error_file_id"])
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [
        ("bad-param", 400),
        ("no-model", 404),
    ]
    assert errors[1]["error"]["code"] == "model_not_found"
    assert errors[1]["response"]["body"]["error"]["code"] == "model_not_found"
    file_view = client.get(f"/v1/files/{done['output_file_id']}", headers=bearer(key)).json()
    assert file_view["purpose"] == "batch_output"

    usage = billed(db, batch["id"])
    assert sorted(u.billing_key for u in usage) == [
        f"batch:{batch['id']}:first",
        f"batch:{batch['id']}:second",
    ]
    by_key = {u.billing_key.rsplit(":", 1)[1]: u for u in usage}
    for out in outputs:
        tokens = out["response"]["body"]["usage"]
        assert by_key[out["custom_id"]].prompt_tokens == tokens["prompt_tokens"]
        assert by_key[out["custom_id"]].completion_tokens == tokens["completion_tokens"]


def test_chat_lines_equal_online_chat(client, make_tenant, start_batch, run_batch) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    body = {"model": model_of(client, key), **CHAT}
    batch = start_batch(key, [request_line("c", body, CHAT_URL)], endpoint=CHAT_URL)
    assert run_batch(batch["id"]) == "completed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=bearer(key)).json()
    [out] = output_lines(client, key, done["output_file_id"])
    online = client.post(CHAT_URL, headers=bearer(key), json=body).json()
    assert out["response"]["body"]["object"] == "chat.completion"
    assert stable(out["response"]["body"]) == stable(online)


def test_staged_lines_are_never_run_or_billed_twice(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, db
) -> None:
    _, key = make_tenant("acme")
    model = model_of(client, key)
    lines = [request_line(f"r{i}", {"model": model, **COMPLETION}) for i in range(6)]
    batch_id = start_batch(key, lines)["id"]
    with db() as session:
        batch = session.get(Batch, batch_id)
    marker = LineResult(0, "r0", 200, "earlier-run", {"from": "an earlier run"}, None)
    assert stage_line(db, batch, marker)  # as if a killed worker had finished line 0
    assert run_batch(batch_id) == "completed"

    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    outputs = output_lines(client, key, done["output_file_id"])
    assert [o["custom_id"] for o in outputs] == [f"r{i}" for i in range(6)]
    assert outputs[0]["response"]["body"] == {"from": "an earlier run"}
    assert len(billed(db, batch_id)) == 5

    again = LineResult(1, "r1", 200, "x", {}, None, usage=None)
    assert not stage_line(db, batch, again)
    assert run_batch(batch_id) == "completed"  # a redelivered task finds nothing to do
    after = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert after == done and len(billed(db, batch_id)) == 5


def test_another_workers_live_lease_is_left_alone(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, db
) -> None:
    _, key = make_tenant("acme")
    lines = [request_line("a", {"model": model_of(client, key), **COMPLETION})]
    batch_id = start_batch(key, lines)["id"]
    assert claim_lease(db, batch_id, "someone-else", 3600)
    assert run_batch(batch_id) == "busy"
    with db.begin() as session:  # its worker died: the lease lapses
        past = datetime.now(UTC) - timedelta(seconds=1)
        session.execute(update(Batch).where(Batch.id == batch_id).values(lease_expires_at=past))
    assert run_batch(batch_id) == "completed"
    with db() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.lease_owner is None


def run_past_first_line(
    run_batch: Callable[..., str], db: sessionmaker[Session], batch_id: str
) -> tuple[threading.Thread, list[str]]:
    """Run the batch (two lines in flight) on a thread; return once a line is staged.

    The thread appends the batch's final status to the list it returns with it.
    """
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_batch(batch_id, batch_max_in_flight=2))
    )
    runner.start()
    while True:
        with db() as session:
            completed = session.scalar(select(Batch.completed).where(Batch.id == batch_id))
        if completed:
            return runner, outcome
        assert runner.is_alive()
        time.sleep(0.02)


def test_cancel_keeps_partial_results(client, make_tenant, start_batch, run_batch, db) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    body = {"model": model_of(client, key), **COMPLETION, "max_tokens": 64}
    batch_id = start_batch(key, [request_line(f"r{i}", body) for i in range(40)])["id"]
    runner, outcome = run_past_first_line(run_batch, db, batch_id)
    cancel = client.post(f"/v1/batches/{batch_id}/cancel", headers=bearer(key))
    assert cancel.json()["status"] == "cancelling"
    runner.join()
    assert outcome == ["cancelled"]
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["status"] == "cancelled" and isinstance(done["cancelled_at"], int)
    outputs = output_lines(client, key, done["output_file_id"])
    assert 1 <= len(outputs) == done["request_counts"]["completed"] < 40
    assert len({o["custom_id"] for o in outputs}) == len(outputs)
    assert len(billed(db, batch_id)) == len(outputs)


def test_lines_past_the_monthly_quota_fail(client, make_tenant, start_batch, run_batch) -> None:  # type: ignore[no-untyped-def]
    # 16 prompt + 8 completion tokens a line: exactly two lines fit, whether the quota is
    # checked against what is recorded or each line's reservation must fit what is left
    _, key = make_tenant("acme", monthly_token_quota=48)
    body = {"model": model_of(client, key), **COMPLETION}
    batch_id = start_batch(key, [request_line(f"r{i}", body) for i in range(4)])["id"]
    assert run_batch(batch_id, batch_max_in_flight=1) == "completed"
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    errors = output_lines(client, key, done["error_file_id"])
    assert [e["custom_id"] for e in errors] == ["r2", "r3"]
    assert {e["error"]["code"] for e in errors} == {"insufficient_quota"}
    assert {e["response"]["status_code"] for e in errors} == {429}


def test_lines_for_another_endpoint_fail_the_batch(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch
) -> None:
    _, key = make_tenant("acme")
    lines = [request_line("a", {"model": "m", "prompt": "x"})]
    batch_id = start_batch(key, lines, endpoint=CHAT_URL)["id"]
    assert run_batch(batch_id) == "failed"
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert isinstance(done["failed_at"], int) and done["output_file_id"] is None
    [error] = done["errors"]["data"]
    assert error["code"] == "mismatched_endpoint" and error["message"].startswith("line 1:")


def test_expired_batch_reports_unrun_lines(client, make_tenant, start_batch, run_batch, db) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    body = {"model": model_of(client, key), **COMPLETION, "max_tokens": 32}
    batch_id = start_batch(key, [request_line(f"r{i}", body) for i in range(12)])["id"]
    with db.begin() as session:
        past = datetime.now(UTC) - timedelta(seconds=1)
        session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=past))
    assert run_batch(batch_id, batch_max_in_flight=1) == "expired"
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    counts = done["request_counts"]
    assert counts["failed"] >= 1 and counts["completed"] + counts["failed"] == 12
    errors = output_lines(client, key, done["error_file_id"])
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    everyone = errors + output_lines(client, key, done["output_file_id"])
    assert sorted(e["custom_id"] for e in everyone) == sorted(f"r{i}" for i in range(12))
    with db() as session:
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == counts["completed"]
