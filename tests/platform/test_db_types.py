"""Registry timestamps are aware UTC datetimes on both backends, and revisions stay plain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from alembic.autogenerate import render_python_code
from alembic.operations import ops
from sqlalchemy import Column, select, text
from sqlalchemy.orm import Session, sessionmaker

from loramux.db.migrate import upgrade
from loramux.db.models import ApiKey, Tenant
from loramux.db.session import make_engine, make_session_factory, transaction
from loramux.db.types import UTCDateTime, render_item
from tests.fixtures.services import both_registries
from tests.platform.registry_rows import add_tenant


@both_registries
def test_timestamps_round_trip_as_aware_utc(db: sessionmaker[Session]) -> None:
    instant = datetime(2026, 3, 15, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    with transaction(db) as session:
        tenant = add_tenant(session, "acme")
        key = ApiKey(
            tenant_id=tenant.id,
            name="k",
            prefix="lmx_abc",
            secret_sha256="0" * 64,
            scopes=["inference"],
            expires_at=instant,
            revoked_at=datetime(2026, 3, 14, 23, 30),  # naive: taken as UTC
        )
        session.add(key)
    with db() as session:
        stored = session.scalars(select(ApiKey)).one()
        # Comparisons in SQL see the instant, whatever zone it was written in.
        ordered = session.scalars(
            select(ApiKey.id).where(ApiKey.expires_at < datetime(2026, 3, 14, 23, 31, tzinfo=UTC))
        ).all()
    for value in (stored.created_at, stored.expires_at, stored.revoked_at):
        assert value is not None and value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)
    assert stored.expires_at == datetime(2026, 3, 14, 23, 30, tzinfo=UTC)
    assert stored.revoked_at == datetime(2026, 3, 14, 23, 30, tzinfo=UTC)
    assert stored.created_at <= datetime.now(UTC)  # comparable with aware values
    assert ordered == [stored.id]


@both_registries
def test_a_stamped_row_compares_equal_to_its_own_timestamp(db: sessionmaker[Session]) -> None:
    """Pagination's ``created_at = anchor.created_at``: on SQLite a CURRENT_TIMESTAMP stamp
    (no fraction) never equals the bound value of the same instant."""
    with transaction(db) as session:
        tenant_id = add_tenant(session, "acme").id
    with db() as session:
        stamp = session.scalars(select(Tenant.created_at)).one()
        same = session.scalars(select(Tenant.id).where(Tenant.created_at == stamp)).all()
        earlier = session.scalars(select(Tenant.id).where(Tenant.created_at < stamp)).all()
    assert same == [tenant_id] and earlier == []


def test_the_migration_rewrites_sqlites_short_stamps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url, "c03ed55877ce")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # a row as the old code stamped it
            conn.execute(text("INSERT INTO tenants (id, name) VALUES ('ten_old', 'acme')"))
        upgrade(url)
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT created_at FROM tenants")).scalar_one()
        with make_session_factory(engine)() as session:
            stamp = session.scalars(select(Tenant.created_at)).one()
            same = session.scalars(select(Tenant.id).where(Tenant.created_at == stamp)).all()
    finally:
        engine.dispose()
    assert len(raw) == len("2026-01-31 12:00:00.000000")
    assert same == ["ten_old"]


def test_revisions_render_utc_datetime_as_plain_sqlalchemy() -> None:
    upgrade = ops.UpgradeOps(ops=[ops.AddColumnOp("t", Column("at", UTCDateTime()))])
    code = render_python_code(upgrade, render_item=render_item)
    assert "sa.DateTime(timezone=True)" in code
    assert "loramux" not in code
