"""Usage metering on both registries: ``GET /v1/usage`` per UTC day, and the monthly quota."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from itertools import count
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from loramux.billing import day_start, priced_usage
from loramux.db.models import UsageRecord
from loramux.db.session import make_engine, make_session_factory, transaction
from loramux.usage import month_start, record_usage, tokens_this_month
from tests.fixtures.services import both_registries
from tests.platform.registry_rows import add_adapter_version, add_tenant

_request_ids = count()
BASE_MODEL = "smollm2-135m-instruct"  # what the test app serves, and add_adapter_version's


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def usage_fields(tenant_id: str, prompt: int, completion: int, **fields: Any) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "request_id": f"req-{next(_request_ids)}",
        "endpoint": "/v1/completions",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "status": "ok",
        **fields,
    }


def usage(tenant_id: str, prompt: int, completion: int, **fields: Any) -> UsageRecord:
    return UsageRecord(**usage_fields(tenant_id, prompt, completion, **fields))


def day_row(day: str, adapter: str | None, num: int, prompt: int, completion: int) -> dict:
    return {
        "date": day,
        "adapter": adapter,
        "adapter_version": None if adapter is None else 1,
        "base_model": BASE_MODEL,
        "num_requests": num,
        "num_batch_requests": 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_micro_usd": 0,  # no price table yet: free
        "cost_usd": "0.000000",
    }


@both_registries
def test_usage_appears_as_soon_as_a_request_is_recorded(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    tenant, secret = make_tenant("acme")
    with transaction(db) as session:
        assert record_usage(session, **usage_fields(tenant["id"], 3, 4))
    with db() as session:
        created = session.query(UsageRecord.created_at).scalar()
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    response = client.get("/v1/usage", headers=bearer(secret))
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [day_row(created.date().isoformat(), None, 1, 3, 4)]


@both_registries
def test_usage_is_bucketed_by_utc_day_adapter_and_tenant(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    tenant, secret = make_tenant("acme")
    other, _ = make_tenant("globex")
    plus_two = timezone(timedelta(hours=2))
    with transaction(db) as session:
        version = add_adapter_version(session, tenant["id"], "bot", "a" * 64)
        session.add_all(
            [
                usage(tenant["id"], 10, 5, created_at=datetime(2026, 3, 14, 23, 30, tzinfo=UTC)),
                # 23:59:59 UTC, written in another zone: still March 14th.
                usage(
                    tenant["id"],
                    7,
                    1,
                    adapter_version_id=version.id,
                    created_at=datetime(2026, 3, 15, 1, 59, 59, tzinfo=plus_two),
                ),
                usage(tenant["id"], 1, 2, created_at=datetime(2026, 3, 15, tzinfo=UTC)),
                usage(tenant["id"], 100, 100, created_at=datetime(2026, 3, 16, tzinfo=UTC)),
                usage(other["id"], 50, 50, created_at=datetime(2026, 3, 14, 12, tzinfo=UTC)),
            ]
        )
    response = client.get(
        "/v1/usage?start_date=2026-03-14&end_date=2026-03-15", headers=bearer(secret)
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [
        day_row("2026-03-14", None, 1, 10, 5),  # the base model sorts first on both backends
        day_row("2026-03-14", "bot", 1, 7, 1),
        day_row("2026-03-15", None, 1, 1, 2),
    ]


@both_registries
def test_monthly_quota_counts_this_months_tokens_only(db: sessionmaker[Session]) -> None:
    start = month_start()
    with transaction(db) as session:
        tenant = add_tenant(session, "acme")
        tenant.monthly_token_quota = 10
        session.add_all(
            [
                usage(tenant.id, 500, 500, created_at=start - timedelta(seconds=1)),
                usage(tenant.id, 4, 5, created_at=start),
            ]
        )
    with db() as session:
        assert tokens_this_month(session, tenant.id) == 9  # last month's 1000 do not count
    with transaction(db) as session:
        session.add(usage(tenant.id, 1, 0))
    with db() as session:
        assert tokens_this_month(session, tenant.id) == 10


def test_usage_days_are_utc_whatever_the_postgres_session_time_zone(
    pg_database: str, db: sessionmaker[Session]
) -> None:
    with transaction(db) as session:
        tenant = add_tenant(session, "acme")
        session.add(usage(tenant.id, 1, 1, created_at=datetime(2026, 3, 14, 23, 30, tzinfo=UTC)))
    # UTC+14: a cast to date in the session's zone would say March 15th.
    engine = make_engine(pg_database, connect_args={"options": "-c timezone=Pacific/Kiritimati"})
    try:
        with make_session_factory(engine)() as session:
            lines = priced_usage(
                session,
                day_start(date(2026, 3, 14)),
                day_start(date(2026, 3, 16)),
                base_model_id=BASE_MODEL,
                tenant_id=tenant.id,
            )
    finally:
        engine.dispose()
    assert [line.date for line in lines] == [date(2026, 3, 14)]


def test_hostile_numbers_in_tenant_routes_are_4xx(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    """Superscript digits pass ``str.isdigit`` and fail ``int``; year 9999's last day has no
    day after it; a version number of thousands of digits: each a clear 4xx, never a 500."""

    tenant, secret = make_tenant("acme")
    with transaction(db) as session:
        add_adapter_version(session, tenant["id"], "bot", "c" * 64)
    for path, status in [
        ("/v1/usage?end_date=9999-12-31", 400),
        ("/v1/usage?start_date=0001-01-01", 400),
        ("/v1/batches?limit=%C2%B2", 400),
        ("/v1/batches?limit=" + "9" * 5000, 400),
        ("/v1/adapters/bot/versions/%C2%B2/merge", 404),
        ("/v1/adapters/bot/versions/" + "9" * 5000 + "/merge", 404),
    ]:
        response = client.get(path, headers=bearer(secret))
        assert response.status_code == status, (path[:60], response.text)
        assert response.json()["error"]["message"]
    from loramux.errors import NotFound
    from loramux.resolve import resolve_model

    with db() as session:
        for model in ["bot@\u00b2", "bot@" + "9" * 5000, "bot@\u0663"]:
            with pytest.raises(NotFound) as refused:
                resolve_model(session, tenant["id"], model, BASE_MODEL)
            assert refused.value.code == "model_not_found"
