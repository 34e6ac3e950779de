"""A batch stops when its tenant is suspended or its key revoked or expired: no line is
admitted after the check saw it, none is billed after it committed, the lines left are
refused in the error file and the batch fails, saying why."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from loramux.db.models import ApiKey, Batch
from tests.platform.batches.conftest import bearer, request_line
from tests.platform.batches.test_runner import (
    COMPLETION,
    billed,
    model_of,
    output_lines,
    run_past_first_line,
)
from tests.platform.conftest import admin_headers

REFUSALS = {
    "tenant_suspended": (403, "permission_error"),
    "revoked_api_key": (401, "authentication_error"),
    "expired_api_key": (401, "authentication_error"),
}


def suspend(client, tenant_id: str, status: str = "suspended") -> None:  # type: ignore[no-untyped-def]
    response = client.patch(
        f"/admin/api/tenants/{tenant_id}", json={"status": status}, headers=admin_headers()
    )
    assert response.status_code == 200, response.text


def key_id_of(db, tenant_id: str) -> str:  # type: ignore[no-untyped-def]
    with db() as session:
        return str(session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id)).one())


def assert_refused(
    client: Any, key: str, batch_id: str, code: str, total: int
) -> list[dict[str, Any]]:
    """The batch failed for ``code``; every line is in exactly one file; returns the outputs.

    Read with the tenant active again: a suspended tenant cannot read its own files.
    """
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["status"] == "failed" and isinstance(done["failed_at"], int), done
    [error] = done["errors"]["data"]
    assert error["code"] == code and error["message"]
    counts = done["request_counts"]
    assert counts["total"] == total and counts["completed"] + counts["failed"] == total
    outputs = output_lines(client, key, done["output_file_id"])
    refused = output_lines(client, key, done["error_file_id"])
    assert len(outputs) == counts["completed"] and len(refused) == counts["failed"] >= 1
    status, kind = REFUSALS[code]
    for line in refused:
        assert line["error"]["code"] == code
        assert line["response"]["status_code"] == status
        body_error = line["response"]["body"]["error"]
        assert set(body_error) == {"message", "type", "param", "code"}
        assert body_error["type"] == kind and body_error["code"] == code
    everyone = sorted(line["custom_id"] for line in outputs + refused)
    assert everyone == sorted(f"r{i}" for i in range(total))
    return outputs


def test_suspension_mid_batch_stops_admitting_and_billing(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, db
) -> None:
    tenant, key = make_tenant("acme")
    body = {"model": model_of(client, key), **COMPLETION, "max_tokens": 64}
    batch_id = start_batch(key, [request_line(f"r{i}", body) for i in range(40)])["id"]
    runner, outcome = run_past_first_line(run_batch, db, batch_id)
    suspend(client, tenant["id"])
    # Staging reads the tenant under a share lock, so the suspension's commit waited for any
    # line being billed at that moment, and nothing can be billed from here on.
    billed_at_suspension = len(billed(db, batch_id))
    runner.join()
    assert outcome == ["failed"]
    assert len(billed(db, batch_id)) == billed_at_suspension >= 1

    suspend(client, tenant["id"], "active")
    outputs = assert_refused(client, key, batch_id, "tenant_suspended", 40)
    assert len(outputs) == billed_at_suspension < 40
    assert {o["response"]["status_code"] for o in outputs} == {200}
    assert run_batch(batch_id) == "failed"  # a redelivered task leaves a finished batch alone


def _revoke(client, db, tenant_id: str) -> None:  # type: ignore[no-untyped-def]
    deleted = client.delete(f"/admin/api/keys/{key_id_of(db, tenant_id)}", headers=admin_headers())
    assert deleted.status_code == 200, deleted.text


def _expire(client, db, tenant_id: str) -> None:  # type: ignore[no-untyped-def]
    past = datetime.now(UTC) - timedelta(seconds=1)
    with db.begin() as session:
        session.execute(
            update(ApiKey).where(ApiKey.id == key_id_of(db, tenant_id)).values(expires_at=past)
        )


def _suspend(client, db, tenant_id: str) -> None:  # type: ignore[no-untyped-def]
    suspend(client, tenant_id)


@pytest.mark.parametrize(
    ("change", "code"),
    [(_revoke, "revoked_api_key"), (_expire, "expired_api_key"), (_suspend, "tenant_suspended")],
)
def test_no_line_of_a_batch_runs_once_its_key_or_tenant_is_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, db, change: Callable[..., None], code: str
) -> None:
    tenant, key = make_tenant("acme")
    body = {"model": model_of(client, key), **COMPLETION}
    batch_id = start_batch(key, [request_line(f"r{i}", body) for i in range(3)])["id"]
    change(client, db, tenant["id"])
    assert run_batch(batch_id) == "failed"
    assert billed(db, batch_id) == []
    with db() as session:  # read as the registry holds it: the key may no longer read files
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.completed == 0 and batch.failed == 3
        assert batch.errors is not None and batch.errors["data"][0]["code"] == code
    if code == "tenant_suspended":
        suspend(client, tenant["id"], "active")
        assert assert_refused(client, key, batch_id, code, 3) == []
