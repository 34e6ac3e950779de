"""Admin usage, prices and statements, adapters and batches across tenants, on both registries.

Expected costs are computed here from the records and the prices as the operator wrote them
(Fractions of USD), never by loramux.billing.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.adapters import registry
from loramux.db.models import (
    Adapter,
    AdapterMerge,
    AdapterVersion,
    Batch,
    File,
    PriceTable,
    UsageRecord,
)
from loramux.db.session import transaction
from tests.fixtures.services import both_registries
from tests.platform.conftest import admin_headers
from tests.platform.registry_rows import add_adapter_version
from tests.platform.test_usage import BASE_MODEL, bearer, usage

MARCH = [
    # (price table, effective from): the second one takes over mid-month
    (
        {
            "models": {
                BASE_MODEL: {
                    "input_per_million_tokens": "0.15",
                    "output_per_million_tokens": "0.6",
                },
                "*": {"input_per_million_tokens": "1", "output_per_million_tokens": "2"},
            },
            "storage_per_gb_month": "0.023",
            "batch_discount_percent": "50",
        },
        datetime(2026, 2, 20, tzinfo=UTC),
    ),
    (
        {
            "models": {
                BASE_MODEL: {
                    "input_per_million_tokens": "0.333333",
                    "output_per_million_tokens": "1.25",
                }
            },
            "storage_per_gb_month": "0.1",
            "batch_discount_percent": "12.5",
        },
        datetime(2026, 3, 15, 12, tzinfo=UTC),
    ),
]


def put_prices(client: TestClient, table: dict[str, Any]) -> dict[str, Any]:
    response = client.put("/admin/api/prices", json=table, headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.json()


def install_march_prices(client: TestClient, db: sessionmaker[Session]) -> None:
    """Through the API, then moved back in time to when each took effect."""
    for table, effective_at in MARCH:
        row_id = put_prices(client, table)["id"]
        with transaction(db) as session:
            session.execute(
                update(PriceTable).where(PriceTable.id == row_id).values(effective_at=effective_at)
            )


def table_at(when: datetime) -> dict[str, Any]:
    return [table for table, start in MARCH if start <= when][-1]


def usd(value: str) -> Fraction:
    return Fraction(value)


def record_cost(record: UsageRecord, model: str) -> Fraction:
    """USD, exact, as the operator's table reads."""
    table = table_at(record.created_at)
    free = {"input_per_million_tokens": "0", "output_per_million_tokens": "0"}
    price = table["models"].get(model) or table["models"].get("*", free)
    cost = (
        record.prompt_tokens * usd(price["input_per_million_tokens"])
        + record.completion_tokens * usd(price["output_per_million_tokens"])
    ) / 10**6
    if (record.billing_key or "").startswith("batch:"):
        cost *= 1 - usd(table["batch_discount_percent"]) / 100
    return cost


def to_micro(cost_usd: Fraction) -> int:
    """Half up to whole micro-dollars."""
    return int(cost_usd * 10**6 + Fraction(1, 2))


@both_registries
def test_statement_is_the_sum_of_usage_records_priced_by_the_table(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    tenant, _ = make_tenant("acme")
    other, _ = make_tenant("globex")
    install_march_prices(client, db)
    records: list[tuple[UsageRecord, str, str]] = []  # (record, base model, adapter name)
    with transaction(db) as session:
        bot = add_adapter_version(session, tenant["id"], "bot", "a" * 64)
        legal = add_adapter_version(session, tenant["id"], "legal", "b" * 64)
        session.execute(  # an adapter on a base model the table prices only by its "*" row
            update(Adapter).where(Adapter.id == legal.adapter_id).values(base_model_id="llama-x")
        )
        times = [
            datetime(2026, 3, 1, 0, 0, tzinfo=UTC),
            datetime(2026, 3, 15, 11, 59, 59, tzinfo=UTC),  # old prices
            datetime(2026, 3, 15, 12, 0, 0, tzinfo=UTC),  # new prices, same day
            datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC),
        ]
        for i, when in enumerate(times):
            for version, model, name in (
                (None, BASE_MODEL, ""),
                (bot, BASE_MODEL, "bot"),
                (legal, "llama-x", "legal"),
            ):
                for batch in (False, True):
                    record = usage(
                        tenant["id"],
                        1_234_567 + 7 * i,
                        89_011 + 13 * i,
                        adapter_version_id=None if version is None else version.id,
                        created_at=when,
                        billing_key=f"batch:b{i}:{version and version.id}" if batch else None,
                    )
                    session.add(record)
                    records.append((record, model, name))
        # Outside the month or another tenant's: never on this statement.
        session.add(usage(tenant["id"], 10**6, 10**6, created_at=datetime(2026, 4, 1, tzinfo=UTC)))
        session.add(usage(tenant["id"], 10**6, 10**6, created_at=datetime(2026, 2, 28, tzinfo=UTC)))
        session.add(usage(other["id"], 10**6, 10**6, created_at=datetime(2026, 3, 5, tzinfo=UTC)))
        # Storage: 3 GB stored from March 10th; 2 GB deleted on March 20th; rejected: none.
        stored = add_adapter_version(
            session, tenant["id"], "stored", "c" * 64, created_at=datetime(2026, 3, 10, tzinfo=UTC)
        )
        stored.size_bytes = 3 * 10**9
        gone = add_adapter_version(
            session, tenant["id"], "gone", "d" * 64, created_at=datetime(2026, 2, 1, tzinfo=UTC)
        )
        gone.size_bytes = 2 * 10**9
        session.execute(
            update(Adapter)
            .where(Adapter.id == gone.adapter_id)
            .values(deleted_at=datetime(2026, 3, 20, tzinfo=UTC))
        )
        refused = add_adapter_version(
            session, tenant["id"], "refused", "e" * 64, status="rejected",
            created_at=datetime(2026, 3, 2, tzinfo=UTC),
        )  # fmt: skip
        refused.size_bytes = 10**12
        for version in (bot, legal):  # no storage worth a line: 1 byte each
            version.created_at = datetime(2026, 4, 1, tzinfo=UTC)

    # expected usage lines: per day, kind and adapter version, each rounded once
    lines: dict[tuple[str, str, str, str], Fraction] = defaultdict(Fraction)
    for record, model, name in records:
        kind = "batch" if record.billing_key else "interactive"
        key = (record.created_at.date().isoformat(), kind, name, "1" if name else "")
        lines[key] += record_cost(record, model)
    expected_usage = {key: to_micro(cost) for key, cost in lines.items()}

    # expected storage: GB x share of March's 31 days, priced by the table of each part
    change = MARCH[1][1]
    old_price, new_price = usd("0.023"), usd("0.1")
    month = Fraction(31 * 86400)

    def storage(gb: int, start: datetime, end: datetime) -> Fraction:
        before = max(min(end, change) - start, timedelta(0)).total_seconds()
        after = max(end - max(start, change), timedelta(0)).total_seconds()
        return gb * (Fraction(before) * old_price + Fraction(after) * new_price) / month

    end_of_march = datetime(2026, 4, 1, tzinfo=UTC)
    march_1, march_10, march_20 = (datetime(2026, 3, d, tzinfo=UTC) for d in (1, 10, 20))
    storage_exact = {
        "stored": storage(3, march_10, end_of_march),
        "gone": storage(2, march_1, march_20),
    }
    expected_storage = {name: to_micro(cost) for name, cost in storage_exact.items()}

    response = client.get(
        f"/admin/api/tenants/{tenant['id']}/statement?month=2026-03", headers=admin_headers()
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="statement-acme-2026-03.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    to_int = lambda value: round(Fraction(value) * 10**6)  # noqa: E731
    got_usage = {
        (r["date"], r["kind"], r["adapter"], r["adapter_version"]): to_int(r["cost_usd"])
        for r in rows
        if r["kind"] in ("interactive", "batch")
    }
    got_storage = {r["adapter"]: to_int(r["cost_usd"]) for r in rows if r["kind"] == "storage"}
    assert got_usage == expected_usage
    assert got_storage == expected_storage
    total = [r for r in rows if r["kind"] == "total"]
    assert len(total) == 1 and total[0] == rows[-1]
    expected_total = sum(expected_usage.values()) + sum(expected_storage.values())
    assert to_int(total[0]["cost_usd"]) == expected_total > 0
    # Rounding each line moves the total by at most half a micro-dollar per line.
    exact = (sum(lines.values()) + sum(storage_exact.values())) * 10**6
    assert abs(expected_total - exact) <= Fraction(len(lines) + len(storage_exact), 2)
    tokens = {r["kind"]: 0 for r in rows}
    for r in rows:
        if r["kind"] in ("interactive", "batch"):
            tokens[r["kind"]] += int(r["input_tokens"])
    assert (
        tokens["interactive"]
        == tokens["batch"]
        == sum(record.prompt_tokens for record, _, _ in records if not record.billing_key)
    )


@both_registries
def test_usage_cost_in_v1_usage_and_admin_usage_agree(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    tenant, secret = make_tenant("acme")
    other, _ = make_tenant("globex")
    install_march_prices(client, db)
    day = datetime(2026, 3, 16, 9, tzinfo=UTC)
    with transaction(db) as session:
        bot = add_adapter_version(session, tenant["id"], "bot", "a" * 64)
        mine = [
            usage(tenant["id"], 2_000_000, 400_000, created_at=day),
            usage(tenant["id"], 1_000_000, 0, created_at=day, adapter_version_id=bot.id),
            usage(tenant["id"], 0, 800_000, created_at=day, billing_key="batch:x:1"),
        ]
        session.add_all([*mine, usage(other["id"], 5, 5, created_at=day)])
    expected = {
        None: to_micro(record_cost(mine[0], BASE_MODEL) + record_cost(mine[2], BASE_MODEL)),
        "bot": to_micro(record_cost(mine[1], BASE_MODEL)),
    }
    dates = "start_date=2026-03-16&end_date=2026-03-16"
    own = client.get(f"/v1/usage?{dates}", headers=bearer(secret)).json()["data"]
    assert {row["adapter"]: row["cost_micro_usd"] for row in own} == expected
    assert {row["adapter"]: row["num_batch_requests"] for row in own} == {None: 1, "bot": 0}

    admin = client.get(f"/admin/api/usage?{dates}", headers=admin_headers()).json()
    assert {(r["tenant"], r["adapter"]) for r in admin["data"]} == {
        ("acme", None), ("acme", "bot"), ("globex", None),
    }  # fmt: skip
    acme = [r for r in admin["data"] if r["tenant"] == "acme"]
    assert {r["adapter"]: r["cost_usd"] for r in acme} == {r["adapter"]: r["cost_usd"] for r in own}
    assert admin["totals"]["num_requests"] == 4
    assert (admin["start_date"], admin["end_date"]) == ("2026-03-16", "2026-03-16")

    filtered = client.get(
        f"/admin/api/usage?{dates}&tenant=acme&adapter=bot", headers=admin_headers()
    ).json()
    assert [(r["tenant_id"], r["adapter"], r["prompt_tokens"]) for r in filtered["data"]] == [
        (tenant["id"], "bot", 1_000_000)
    ]
    assert filtered["totals"]["cost_micro_usd"] == expected["bot"]
    outside = client.get(
        "/admin/api/usage?start_date=2026-03-17&end_date=2026-03-31", headers=admin_headers()
    ).json()
    assert outside["data"] == [] and outside["totals"]["cost_usd"] == "0.000000"
    paged = client.get(f"/admin/api/usage?{dates}&limit=1", headers=admin_headers()).json()
    assert len(paged["data"]) == 1 and paged["has_more"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"currency": "EUR"}, "currency"),
        ({"storage_per_gb_month": "-1"}, "storage_per_gb_month"),
        ({"storage_per_gb_month": "0.0000001"}, "storage_per_gb_month"),
        ({"storage_per_gb_month": "lots"}, "storage_per_gb_month"),
        ({"storage_per_gb_month": True}, "storage_per_gb_month"),
        ({"batch_discount_percent": "100.5"}, "batch_discount_percent"),
        ({"models": {"m": {"input_per_million_tokens": "1", "x": 1}}}, "models.m"),
        (
            {"models": {"m": {"input_per_million_tokens": "NaN"}}},
            "models.m.input_per_million_tokens",
        ),
        ({"models": []}, "models"),
    ],
)
def test_bad_price_tables_are_refused_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    response = client.put("/admin/api/prices", json=body, headers=admin_headers())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/admin/api/prices", headers=admin_headers()).json()["id"] is None


def test_price_table_round_trips_and_is_audited(client: TestClient, make_tenant: Any) -> None:
    assert client.get("/admin/api/prices").status_code == 401
    _, secret = make_tenant("acme")
    assert client.put("/admin/api/prices", json={}, headers=bearer(secret)).status_code == 403
    table = MARCH[0][0]
    saved = put_prices(client, table)
    fetched = client.get("/admin/api/prices", headers=admin_headers()).json()
    assert fetched == saved
    assert fetched["models"][BASE_MODEL] == {
        "input_per_million_tokens": "0.150000",
        "output_per_million_tokens": "0.600000",
    }
    assert fetched["batch_discount_percent"] == "50.00"
    # What GET shows is what PUT takes: saving it again changes nothing but the version.
    again = put_prices(client, {k: fetched[k] for k in table})
    assert {k: again[k] for k in table} == {k: fetched[k] for k in table}
    assert again["id"] != fetched["id"]
    audit = client.get("/admin/api/audit", headers=admin_headers()).json()["data"]
    assert [e["action"] for e in audit[:2]] == ["prices.update", "prices.update"]


@both_registries
def test_tenant_list_shows_usage_beside_quotas(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    tenant, _ = make_tenant("acme", max_adapters=5)
    make_tenant("idle")
    put_prices(client, MARCH[0][0])
    now = datetime.now(UTC)
    with transaction(db) as session:
        kept = add_adapter_version(session, tenant["id"], "kept", "a" * 64)
        kept.size_bytes = 1000
        deleted = add_adapter_version(session, tenant["id"], "deleted", "b" * 64)
        deleted.size_bytes = 5000
        session.execute(
            update(Adapter).where(Adapter.id == deleted.adapter_id).values(deleted_at=now)
        )
        add_adapter_version(session, tenant["id"], "refused", "c" * 64, status="rejected")
        session.add(usage(tenant["id"], 1_000_000, 1_000_000, created_at=now))
        session.add(usage(tenant["id"], 5, 5, created_at=now - timedelta(days=40)))
    tenants = client.get("/admin/api/tenants", headers=admin_headers()).json()["data"]
    by_name = {t["name"]: t for t in tenants}
    acme = by_name["acme"]["usage"]
    assert acme["adapters_used"] == 2  # kept and refused: the deleted one is gone
    assert acme["storage_used_bytes"] == 1000  # rejected versions hold no storage
    assert acme["this_month"]["total_tokens"] == 2_000_000
    # 0.15 + 0.60 for the tokens, and a little storage (kept: 1 KB for seconds)
    assert Fraction(acme["this_month"]["usage_cost_usd"]) == Fraction("0.75")
    assert by_name["acme"]["max_adapters"] == 5
    idle = by_name["idle"]["usage"]
    assert idle == {
        "adapters_used": 0,
        "storage_used_bytes": 0,
        "this_month": {
            "num_requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "usage_cost_usd": "0.000000",
            "storage_cost_usd": "0.000000",
            "cost_micro_usd": 0,
            "cost_usd": "0.000000",
        },
    }


@both_registries
def test_admin_sees_a_tenants_adapter_versions_and_deletes_one(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    tenant, secret = make_tenant("acme")
    other, _ = make_tenant("globex")
    used_at = datetime(2026, 3, 3, 4, 5, 6, tzinfo=UTC)
    with transaction(db) as session:
        v1 = add_adapter_version(session, tenant["id"], "bot", "a" * 64)
        v2 = AdapterVersion(
            adapter_id=v1.adapter_id, tenant_id=tenant["id"], version=2, sha256="f" * 64,
            size_bytes=4096, rank=16, alpha=32.0, target_modules=["q_proj", "v_proj"],
            config_key="c", weights_key="w", status="rejected",
            reason="DoRA adapters are not supported",
        )  # fmt: skip
        session.add(v2)
        add_adapter_version(session, other["id"], "secret-bot", "b" * 64)
        session.add(usage(tenant["id"], 1, 1, adapter_version_id=v1.id, created_at=used_at))
        session.add(
            usage(
                tenant["id"], 1, 1, adapter_version_id=v1.id, created_at=used_at - timedelta(days=1)
            )
        )
    path = f"/admin/api/tenants/{tenant['id']}/adapters"
    listed = client.get(path, headers=admin_headers()).json()["data"]
    assert [a["name"] for a in listed] == ["bot"]
    versions = listed[0]["versions"]
    assert [(v["version"], v["status"], v["reason"]) for v in versions] == [
        (1, "ready", None),
        (2, "rejected", "DoRA adapters are not supported"),
    ]
    assert versions[0]["last_used_at"] == int(used_at.timestamp())
    assert versions[0]["num_requests"] == 2
    assert versions[1]["last_used_at"] is None
    assert versions[1]["rank"] == 16 and versions[1]["size_bytes"] == 4096
    assert versions[1]["target_modules"] == ["q_proj", "v_proj"]
    missing = client.get("/admin/api/tenants/nobody/adapters", headers=admin_headers())
    assert missing.status_code == 404

    deleted = client.delete(f"{path}/bot", headers=admin_headers())
    assert deleted.status_code == 200, deleted.text
    assert client.get(path, headers=admin_headers()).json()["data"] == []
    assert client.get("/v1/adapters/bot", headers=bearer(secret)).status_code == 404
    with_deleted = client.get(f"{path}?include_deleted=true", headers=admin_headers()).json()
    assert with_deleted["data"][0]["deleted_at"] is not None
    # another tenant's adapter is not found under this tenant
    assert client.delete(f"{path}/secret-bot", headers=admin_headers()).status_code == 404
    audit = client.get("/admin/api/audit", headers=admin_headers()).json()["data"]
    assert audit[0]["action"] == "adapter.delete"
    assert audit[0]["actor"].startswith("admin:")


def add_batch(session: Session, tenant_id: str, status: str, created_at: datetime) -> Batch:
    file = File(
        tenant_id=tenant_id, filename="in.jsonl", purpose="batch", bytes=1, sha256="0" * 64,
        storage_key="files/x",
    )  # fmt: skip
    session.add(file)
    session.flush()
    batch = Batch(
        tenant_id=tenant_id, endpoint="/v1/chat/completions", input_file_id=file.id,
        status=status, total=4, completed=1, created_at=created_at,
    )  # fmt: skip
    session.add(batch)
    session.flush()
    return batch


@both_registries
def test_batches_across_tenants_filter_page_and_cancel(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    acme, secret = make_tenant("acme")
    globex, _ = make_tenant("globex")
    start = datetime(2026, 3, 1, tzinfo=UTC)
    with transaction(db) as session:
        running = add_batch(session, acme["id"], "in_progress", start)
        done = add_batch(session, acme["id"], "completed", start + timedelta(minutes=1))
        theirs = add_batch(session, globex["id"], "validating", start + timedelta(minutes=2))
        ids = {"running": running.id, "done": done.id, "theirs": theirs.id}
    listed = client.get("/admin/api/batches", headers=admin_headers()).json()
    assert [(b["id"], b["tenant"]) for b in listed["data"]] == [
        (ids["theirs"], "globex"), (ids["done"], "acme"), (ids["running"], "acme"),
    ]  # fmt: skip
    assert listed["data"][0]["request_counts"] == {"total": 4, "completed": 1, "failed": 0}
    by_tenant = client.get("/admin/api/batches?tenant=acme", headers=admin_headers()).json()
    assert [b["id"] for b in by_tenant["data"]] == [ids["done"], ids["running"]]
    by_status = client.get("/admin/api/batches?status=completed", headers=admin_headers()).json()
    assert [b["id"] for b in by_status["data"]] == [ids["done"]]
    first = client.get("/admin/api/batches?limit=1", headers=admin_headers()).json()
    assert first["has_more"] is True
    rest = client.get(
        f"/admin/api/batches?limit=5&after={first['last_id']}", headers=admin_headers()
    ).json()
    assert [b["id"] for b in rest["data"]] == [ids["done"], ids["running"]]
    bad = client.get("/admin/api/batches?status=sleeping", headers=admin_headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"

    cancelled = client.post(f"/admin/api/batches/{ids['running']}/cancel", headers=admin_headers())
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelling"
    own = client.get(f"/v1/batches/{ids['running']}", headers=bearer(secret)).json()
    assert own["status"] == "cancelling"
    refused = client.post(f"/admin/api/batches/{ids['done']}/cancel", headers=admin_headers())
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "batch_not_cancellable"
    missing = client.post("/admin/api/batches/batch_nope/cancel", headers=admin_headers())
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("start_date=2026-13-01", "start_date"),
        ("start_date=2026-03-02&end_date=2026-03-01", "end_date"),
        ("start_date=2020-01-01&end_date=2026-01-01", "start_date"),
        ("limit=0", "limit"),
        ("limit=%C2%B2", "limit"),  # "²": str.isdigit says yes, int() says no
        ("limit=" + "9" * 5000, "limit"),  # past int()'s digit limit
        ("end_date=9999-12-31", "end_date"),  # the day after is no date
        ("tenant=", "tenant"),
    ],
)
def test_bad_usage_filters_are_400(client: TestClient, query: str, param: str) -> None:
    response = client.get(f"/admin/api/usage?{query}", headers=admin_headers())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "month", ["2026-13", "26-03", "2026-3", "march", "9999-12", "\u0662\u0660\u0662\u0666-03"]
)
def test_bad_statement_month_is_400(client: TestClient, make_tenant: Any, month: str) -> None:
    tenant, _ = make_tenant("acme")
    response = client.get(
        f"/admin/api/tenants/{tenant['id']}/statement?month={month}", headers=admin_headers()
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "month"


def test_statement_of_an_unknown_tenant_is_404(client: TestClient) -> None:
    response = client.get("/admin/api/tenants/nobody/statement", headers=admin_headers())
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "tenant"


def add_merge(
    session: Session,
    version: AdapterVersion,
    status: str,
    size_bytes: int,
    finished_at: datetime | None,
) -> AdapterMerge:
    """A merge row as the worker leaves it (no blobs written)."""
    merge = AdapterMerge(
        tenant_id=version.tenant_id, adapter_version_id=version.id,
        base_model_id="smollm2-135m-instruct", status=status, size_bytes=size_bytes,
        sha256="9" * 64 if status == "succeeded" else None,
        created_at=(finished_at or datetime.now(UTC)) - timedelta(hours=1),
        finished_at=finished_at,
    )  # fmt: skip
    session.add(merge)
    session.flush()
    return merge


@both_registries
def test_merged_exports_are_stored_bytes_for_the_quota_the_admin_and_the_bill(
    client: TestClient, make_tenant: Any, db: sessionmaker[Session]
) -> None:
    tenant, _ = make_tenant("acme")
    other, _ = make_tenant("globex")
    install_march_prices(client, db)
    march_1, march_10, march_12 = (datetime(2026, 3, d, tzinfo=UTC) for d in (1, 10, 12))
    with transaction(db) as session:
        bot = add_adapter_version(session, tenant["id"], "bot", "a" * 64, created_at=march_10)
        bot.size_bytes = 10**9
        add_merge(session, bot, "succeeded", 2 * 10**9, finished_at=march_12)
        # A failed merge holds nothing; a running one its reservation, billed once stored.
        failed = add_adapter_version(session, tenant["id"], "failed", "b" * 64, created_at=march_1)
        add_merge(session, failed, "failed", 0, finished_at=march_12)
        running = add_adapter_version(session, tenant["id"], "running", "c" * 64)
        add_merge(session, running, "running", 700, finished_at=None)
        # The same stored bytes as acme's bot and its export, without a merge.
        plain = add_adapter_version(session, other["id"], "plain", "d" * 64, created_at=march_1)
        plain.size_bytes = 3 * 10**9
    # acme: bot 10^9, its export 2*10^9, the reservation 700, the other versions 1 byte each
    expected_bytes = 10**9 + 2 * 10**9 + 700 + 2
    with db() as session:
        assert registry.storage_used(session, tenant["id"]) == expected_bytes

    listed = client.get("/admin/api/tenants", headers=admin_headers()).json()["data"]
    by_name = {t["name"]: t["usage"] for t in listed}
    assert by_name["acme"]["storage_used_bytes"] == expected_bytes
    detail = client.get(f"/admin/api/tenants/{tenant['id']}", headers=admin_headers()).json()
    assert detail["usage"]["storage_used_bytes"] == expected_bytes
    # This month both stored the whole time: acme's 3 GB (adapter and export) cost what
    # globex's 3 GB adapter does, give or take the tiny versions' micro-dollar.
    acme_cost = Fraction(by_name["acme"]["this_month"]["storage_cost_usd"])
    globex_cost = Fraction(by_name["globex"]["this_month"]["storage_cost_usd"])
    assert acme_cost > 0 and abs(acme_cost - globex_cost) <= Fraction(1, 10**6)

    statement = client.get(
        f"/admin/api/tenants/{tenant['id']}/statement?month=2026-03", headers=admin_headers()
    )
    assert statement.status_code == 200, statement.text
    rows = list(csv.DictReader(io.StringIO(statement.text)))
    stored = {(r["kind"], r["adapter"]): r for r in rows if r["kind"].endswith("storage")}
    assert set(stored) == {("storage", "bot"), ("merge_storage", "bot"), ("storage", "failed")}
    change = MARCH[1][1]  # 0.023 USD per GB-month before, 0.1 after
    month = Fraction(31 * 86400)
    end_of_march = datetime(2026, 4, 1, tzinfo=UTC)

    def cost(gb: int, start: datetime) -> int:
        before = Fraction((change - start).total_seconds())
        after = Fraction((end_of_march - change).total_seconds())
        return to_micro(gb * (before * usd("0.023") + after * usd("0.1")) / month)

    to_int = lambda value: round(Fraction(value) * 10**6)  # noqa: E731
    assert to_int(stored[("storage", "bot")]["cost_usd"]) == cost(1, march_10)
    assert to_int(stored[("merge_storage", "bot")]["cost_usd"]) == cost(2, march_12)
    gb_months = 2 * Fraction((end_of_march - march_12).total_seconds()) / month
    printed = Fraction(stored[("merge_storage", "bot")]["gb_months"])  # 9 decimal places
    assert abs(printed - gb_months) <= Fraction(1, 2 * 10**9)
    total = to_int(rows[-1]["cost_usd"])
    assert total == sum(to_int(r["cost_usd"]) for r in rows[:-1]) >= cost(2, march_12) > 0
